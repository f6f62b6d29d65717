"""``embeddings adopt``: register the vectors an application already has as a version, without
re-encoding them (docs/cutover.md, "Adopting existing vectors").

Invariants:

* Nothing is registered unless the model reproduces the existing vectors: a random sample of rows
  is re-embedded from their current source text and compared by cosine similarity; one below the
  threshold (the alias's ``verify_threshold``, or ``EMBEDDINGS["VERIFY_THRESHOLD"]``) refuses the
  adoption with the measured cosines, and nothing is changed. ``verify_all`` re-embeds every row
  instead: a vector that does not match is replaced by the model's (and counted).
* Every adopted vector is recorded with the source hash of the text it was read with, by a
  compare-and-set on the user's row version (``xmin``): a row changed meanwhile gets no hash and
  stays *missing*, so the backfill that follows embeds it; an edit made later makes the row stale
  like any other. A row without an existing vector is missing too.
* Where the vectors stay: a vector column of the user's table is used in place (a ``ColumnStore``
  whose vector column is that column; only a source-hash column is added). Vectors in a table of
  their own (key -> vector), or a column adopted with ``layout="table"``, are copied by the write
  path into a new store of the version (the user's table or column is only read, and stays).
* Existing vectors are one per row: the version embeds whole rows, also with an alias whose
  ``"chunks"`` chunks the versions ``add`` makes of it (the report says so).
* The version is ``new`` when ``adopt()`` returns; ``embeddings adopt`` then backfills it (rows
  missing or changed), which makes it ``ready``. ``stores`` is the only code naming the column or
  table in SQL (``stores.ExistingVectors``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from django.db import transaction

from . import capture, encoders, lifecycle, limits, probes, registry, sources, stores, sync
from .config import get_config
from .exceptions import Refused
from .models import EmbeddingVersion

__all__ = ["AdoptReport", "SampleCheck", "adopt", "check_sample", "record"]

WORST_SHOWN = 5


@dataclass
class SampleCheck:
    """Existing vectors of a sample of rows against the model's embedding of their text."""

    threshold: float
    sampled: int = 0  # rows with a vector drawn
    compared: int = 0  # of them, rows with source text
    below: int = 0
    min_cosine: float | None = None
    mean_cosine: float | None = None
    worst: list[tuple[str, float]] = field(default_factory=list)  # (row key, cosine)

    @property
    def passed(self) -> bool:
        return self.compared > 0 and self.below == 0

    def summary(self) -> str:
        if not self.compared:
            return f"{self.sampled} sampled rows, none with source text to compare"
        return (f"{self.compared} sampled rows re-embedded: min cosine {self.min_cosine:.5f}, "
                f"mean {self.mean_cosine:.5f}, {self.below} below {self.threshold}")


@dataclass
class AdoptReport:
    version: str
    source: str  # where the vectors were
    in_place: bool  # used where they are (else copied into the version's store)
    check: SampleCheck
    rows_with_vector: int = 0
    adopted: int = 0  # vectors recorded with their source hash
    changed: int = 0  # rows changed while being read: left missing (the backfill embeds them)
    verified: int = 0  # verify_all: vectors compared with the model's
    replaced: int = 0  # verify_all: vectors below the threshold replaced by the model's
    min_cosine: float | None = None  # verify_all: the lowest cosine over every compared row
    replaced_keys: list[str] = field(default_factory=list)
    verb: str = "Adopted"  # "Derived" (embeddings_app.derive)
    notes: list[str] = field(default_factory=list)  # said after the figures

    def lines(self) -> list[str]:
        where = "used in place" if self.in_place else "copied into the version's store"
        lines = [f"Sample check {'passed' if self.check.passed else 'tolerated (--verify-all)'}: "
                 f"{self.check.summary()}.",
                 f"{self.verb} {self.adopted} vectors of {self.source} as {self.version} "
                 f"({where}, source hashes recorded)."]
        if self.changed:
            lines.append(f"{self.changed} rows changed while they were read: left for the "
                         "backfill.")
        if self.verified:
            minimum = "-" if self.min_cosine is None else f"{self.min_cosine:.5f}"
            lines.append(f"--verify-all: {self.verified} vectors re-embedded and compared (min "
                         f"cosine {minimum}); {self.replaced} below {self.check.threshold} "
                         "replaced by the model's"
                         + (f" (rows {', '.join(self.replaced_keys[:WORST_SHOWN])}"
                            + (", ..." if self.replaced > WORST_SHOWN else "") + ")"
                            if self.replaced else "") + ".")
        return lines + self.notes


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b) / (
        np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def check_sample(field_: Any, source: Any, encoder: encoders.Encoder,
                 size: int, threshold: float) -> SampleCheck:
    """Re-embed ``size`` random rows that have an existing vector and compare (nothing is
    written)."""
    check = SampleCheck(threshold=threshold)
    vectors = source.sample(size)
    check.sampled = len(vectors)
    instances = field_.source_queryset().filter(pk__in=list(vectors))
    texts = {obj.pk: field_.source_text(obj) for obj in instances}
    keys = [pk for pk in vectors if texts.get(pk, "").strip()]
    check.compared = len(keys)
    if not keys:
        return check
    fresh = encoder.encode_documents([texts[pk] for pk in keys])
    cosines = _cosines(np.vstack([vectors[pk] for pk in keys]), fresh)
    check.min_cosine = float(cosines.min())
    check.mean_cosine = float(cosines.mean())
    check.below = int((cosines < threshold).sum())
    check.worst = [(str(keys[i]), round(float(cosines[i]), 6))
                   for i in np.argsort(cosines)[:WORST_SHOWN]]
    return check


def adopt(target: str, version_name: str, alias: str, *, column: str, table: str | None = None,
          key: str | None = None, layout: str | None = None, sample: int | None = None,
          threshold: float | None = None, verify_all: bool = False,
          batch_size: int | None = None, actor: str = "",
          progress: Callable[[int], Any] | None = None) -> tuple[EmbeddingVersion, AdoptReport]:
    """Register the vectors in ``column`` (of the target's table, or of ``table``, keyed by
    ``key``) as version ``version_name`` of model ``alias``; see the module docstring.

    ``layout``: where the version's vectors live; by default a column of the target's table is
    used in place and a table's vectors are copied into a side table (``"table"``). ``progress``
    is called with the number of rows read, page by page."""
    field_ = registry.get(target)
    target = field_.target
    config = get_config()
    lifecycle.check_version_name(target, version_name)
    sample = config.verify_sample if sample is None else sample
    limits.integer("The verify sample", sample, 1, limits.MAX_VERIFY_SAMPLE, "sample")
    if threshold is not None:
        limits.threshold(threshold)
    page_size = config.batch_size if batch_size is None else batch_size
    limits.integer("The batch size", page_size, 1, limits.MAX_BATCH_SIZE, "batch_size")
    source = stores.ExistingVectors(field_, column, table, key)
    storage, dimensions = source.inspect()
    layout = layout or ("table" if table else "column")
    store_class = stores.store_class(layout)
    in_place = table is None and layout == "column"

    spec, encoder, storage_type = lifecycle.load_new_model(alias)
    if encoder.dimensions != dimensions:
        raise Refused(
            f"{source.describe()} holds {storage}({dimensions}) vectors but model {alias} "
            f"outputs {encoder.dimensions} dimensions: these vectors were not made by this model. "
            "Nothing was adopted.")
    threshold = probes.threshold_for(spec) if threshold is None else threshold
    check = check_sample(field_, source, encoder, sample, threshold)
    if not check.sampled:
        raise Refused(f"No row of {field_.table} has a vector in {source.describe()}: nothing to "
                      f"adopt; add a new version with `manage.py embeddings add {target} "
                      f"{version_name} --model {alias}`.")
    # With verify_all every vector is compared and a mismatch replaced: the sample only has to
    # show the vectors are this model's (at most half of it below the threshold).
    tolerated = verify_all and check.compared and check.below * 2 <= check.compared
    if not check.passed and not tolerated:
        shown = ", ".join(f"row {pk}: {cosine:.4f}" for pk, cosine in check.worst)
        raise Refused(
            f"These vectors were not made by model {alias} with its settings: {check.summary()}"
            + (f" (lowest: {shown})" if shown else "")
            + ". Nothing was adopted; check the alias's model, revision and encode settings "
            "(normalization, prompt, the source fields), or add a new version and backfill it.")

    names = (stores.ColumnStore.adopted_names(field_, version_name, column) if in_place
             else store_class.names(field_, version_name))
    if not in_place:
        store_class.check_new(field_, version_name)
    probe_texts, probe_vectors = probes.initial(encoder, target)
    capture.prepare(field_)  # the logical capture's slot, outside the version's transaction
    with lifecycle.locked_versions(target) as versions:
        if in_place:  # again under the lock
            names = stores.ColumnStore.adopted_names(field_, version_name, column)
        else:
            lifecycle.check_name_free(target, version_name, versions)
            store_class.check_new(field_, version_name)
        version = lifecycle.create_version(
            target, version_name, versions, spec=spec, encoder=encoder,
            storage=storage if in_place else storage_type, layout=store_class.layout,
            names=names, probe_texts=probe_texts, probe_vectors=probe_vectors, actor=actor,
            note=f"adopted {source.describe()} with {spec.model}@{spec.revision} "
                 f"({'in place' if in_place else f'copied, {store_class.layout} layout'}; "
                 f"{check.summary()})")
        store = version.store
        if in_place:
            assert isinstance(store, stores.ColumnStore)
            store.add_adopted()
        else:
            store.add()
    report = AdoptReport(version=str(version), source=source.describe(), in_place=in_place,
                         check=check, rows_with_vector=source.count())
    if spec.chunks:  # existing vectors are whole-row vectors, whatever the alias adds
        report.notes.append(f'Alias "{alias}" chunks the versions it adds (chunks of '
                            f"{spec.chunks} tokens), but these vectors are one per row: "
                            f"{version} embeds whole rows.")
    record(version, field_, source, encoder if verify_all else None, threshold, page_size,
            report, progress)
    return version, report


def record(version: EmbeddingVersion, field_: Any, source: Any,
            encoder: encoders.Encoder | None, threshold: float, page_size: int,
            report: AdoptReport, progress: Callable[[int], Any] | None) -> None:
    """Write each existing vector with the source hash of the text it was read with, a page of
    rows at a time (compare-and-set on the row version read with the text). With ``encoder``
    (``verify_all``), every vector is compared with the model's first."""
    store = version.store
    minimum = None
    for page, _ in sources.iter_source_pages(field_, [], field_.source_queryset(), page_size):
        # After the text: a row changed in between has another version (xmin) than the text's,
        # so its write below is refused.
        vectors = source.read([pk for pk, _, _, _ in page])
        # A source that knows the text each vector was made from (a parent version, for
        # ``derive``) gives its hashes: a vector of another text than the row's is not taken.
        made_from = getattr(source, "last_hashes", None)
        rows, expected, texts = [], {}, {}
        for pk, text, _, row_version in page:
            if made_from is not None and made_from.get(pk) != field_.source_hash(text):
                continue  # left missing: the backfill embeds it
            if pk in vectors:
                rows.append((pk, field_.source_hash(text), vectors[pk]))
                expected[pk] = row_version
                texts[pk] = text
        if encoder is not None:
            compare = [index for index, row in enumerate(rows) if texts[row[0]].strip()]
            if compare:
                fresh = encoder.encode_documents([texts[rows[i][0]] for i in compare])
                cosines = _cosines(np.vstack([rows[i][2] for i in compare]), fresh)
                report.verified += len(compare)
                low = float(cosines.min())
                minimum = low if minimum is None else min(minimum, low)
                for position, index in enumerate(compare):
                    if cosines[position] < threshold:
                        pk, source_hash, _ = rows[index]
                        rows[index] = (pk, source_hash, fresh[position])
                        report.replaced += 1
                        report.replaced_keys.append(str(pk))
        if rows:
            with transaction.atomic():
                if not sync.still_written(field_, [version]):
                    raise Refused(f"{version} was retired or dropped while it was being adopted.")
                # Locked first, in key order, as every write does (sync.write_prepared): a
                # concurrent drain or backfill of the same rows queues instead of deadlocking.
                stores.lock_rows(field_, [row[0] for row in rows])
                written = store.write(rows, expected)
            report.adopted += len(written)
            report.changed += len(rows) - len(written)
        if progress is not None:
            progress(len(page))
    report.min_cosine = minimum

