"""``verify``: are a version's stored vectors still what its pinned model computes?

Checks, in order: the model files behind the alias against the version's fingerprint; the
probes stored at ``add`` re-embedded (``probes``: a model changed under its name); coverage
(rows without a vector); stale rows (source changed since the vector was computed, e.g. by
``QuerySet.update()``); and a random sample of fresh rows re-embedded and compared with the stored
vectors by cosine similarity. Any problem is drift: the report's ``passed`` is False. The report
also counts the rows longer than the model's token limit (``truncation``): a property of the
model and the data, shown, never drift.

Verifying against *another* alias (``model=ALIAS``) answers "does this patch release of the model
need a re-index?": the stored vectors are compared with what the other model computes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from . import encoders, limits, probes, registry, stores, sync, truncation
from .config import get_config
from .exceptions import EmbeddingError, Refused
from .models import EmbeddingVersion, State

WORST_SHOWN = 5


@dataclass
class VerifyReport:
    version: str
    alias: str
    threshold: float
    fingerprint_pinned: str
    fingerprint_now: str = ""
    total: int = 0
    covered: int = 0  # rows with a vector or a recorded empty source
    stale: int = 0
    sampled: int = 0
    compared: int = 0  # sampled rows that were fresh, so comparable
    below_threshold: int = 0
    min_cosine: float | None = None
    mean_cosine: float | None = None
    worst: list[tuple[str, float]] = field(default_factory=list)  # (row key, cosine)
    probe: dict[str, Any] = field(default_factory=dict)  # probes.ProbeReport.as_dict()
    # truncation.Truncation.as_dict(): rows longer than the model's token limit (not drift)
    truncation: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    @property
    def fingerprint_ok(self) -> bool:
        return self.fingerprint_now == self.fingerprint_pinned

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def summary(self) -> str:
        if self.passed:
            matched = (f"{self.compared} sampled vectors match (min cosine {self.min_cosine:.5f} >= "
                       f"{self.threshold})" if self.compared else
                       "no stored vector to compare (no row has source text)")
            return (f"verify PASSED for {self.version}: {matched}, fingerprint ok, "
                    f"{self.covered}/{self.total} rows covered, 0 stale.")
        return f"verify FAILED for {self.version}: " + "; ".join(self.problems) + "."


def verify(version: EmbeddingVersion, *, sample: int | None = None, threshold: float | None = None,
           alias: str | None = None) -> VerifyReport:
    """Check ``version`` (see the module docstring); never raises for drift, only reports it."""
    if version.state == State.DROPPED:
        raise Refused(f"{version} is dropped; there are no stored vectors to verify.")
    config = get_config()
    sample = config.verify_sample if sample is None else sample
    limits.integer("The verify sample", sample, 1, limits.MAX_VERIFY_SAMPLE, "sample")
    if threshold is not None:
        limits.threshold(threshold)
    own_alias = alias is None or alias == version.model_alias
    spec = config.model(alias or version.model_alias)
    threshold = probes.threshold_for(spec) if threshold is None else threshold
    field_ = registry.get(version.target)
    report = VerifyReport(version=str(version), alias=spec.alias, threshold=threshold,
                          fingerprint_pinned=version.fingerprint)

    encoder = None
    try:
        encoder = encoders.load(spec)
        report.fingerprint_now = encoder.fingerprint
    except EmbeddingError as exc:
        report.problems.append(f"model {spec.alias} cannot be loaded: {exc}")
    if encoder is not None and own_alias and not report.fingerprint_ok:
        report.problems.append(
            f"model files changed: fingerprint of {spec.alias} is now "
            f"{report.fingerprint_now[:12]}, pinned {version.fingerprint[:12]} (the files or "
            "encode settings behind the alias differ from those the vectors were made with)"
        )
    if encoder is not None and encoder.dimensions != version.dimensions:
        report.problems.append(
            f"model {spec.alias} outputs {encoder.dimensions} dimensions, the version stores "
            f"{version.dimensions}"
        )
        encoder = None

    if encoder is not None and own_alias:
        probe = probes.compare(version, encoder)
        report.probe = probe.as_dict()
        report.problems.extend(f"probes: {problem}" for problem in probe.problems)

    report.covered, report.total = version.store.coverage()
    if report.covered < report.total:
        report.problems.append(
            f"coverage: {report.total - report.covered} of {report.total} rows have no vector "
            f"(run `manage.py embeddings backfill {version.target} {version.version}`)"
        )
    (report.stale,) = sync.count_stale(field_, [version])
    if report.stale:
        report.problems.append(
            f"stale: {report.stale} rows changed since their embedding (e.g. QuerySet.update(), "
            f"bulk_update or raw SQL); run `Model.{field_.name}.sync()` or backfill"
        )

    if encoder is not None:
        _compare_sample(field_, version, encoder, sample, report)
        report.truncation = truncation.measure(version.target, spec, encoder, by="verify",
                                               chunked=version.chunk_tokens).as_dict()
    return report


def _compare_sample(field_: Any, version: EmbeddingVersion, encoder: encoders.Encoder,
                    sample: int, report: VerifyReport) -> None:
    rows = version.store.sample(sample)
    report.sampled = len(rows)
    if not rows:
        # An empty table, or one whose every source is empty, has nothing to compare and that is
        # not drift; rows with source text but no stored vector are. A list, not an iterator: a
        # half-read server-side cursor would hold a lock on the user's table.
        texts = [field_.source_text(obj) for obj in field_.source_queryset().order_by("?")[:sample]]
        with_text = sum(1 for text in texts if text.strip())  # as sync: blank is empty
        if with_text:
            report.problems.append(
                f"no stored vectors to compare: {with_text} of {len(texts)} sampled rows have "
                "source text but no vector")
        return
    instances = {obj.pk: obj for obj in field_.source_queryset().filter(pk__in=[r[0] for r in rows])}
    keys, texts, stored = [], [], []
    # A chunked version's sample is of chunks: (pk, vector, the row's hash, start, end); each is
    # compared with the embedding of the same span of the row's text.
    for pk, vector, source_hash, *span in rows:
        obj = instances.get(pk)
        if obj is None:
            continue  # deleted meanwhile
        text = field_.source_text(obj)
        if source_hash is None or bytes(source_hash) != field_.source_hash(text):
            continue  # stale: counted above; its vector was made from another text
        keys.append(f"{pk} chunk at {span[0]}:{span[1]}" if span else str(pk))
        texts.append(text[span[0]:span[1]] if span else text)
        stored.append(stores.as_array(vector))
    report.compared = len(keys)
    if not keys:
        return
    fresh = encoder.encode_documents(texts)
    if version.storage == "bit":
        # A binary-quantized version (``embeddings derive --storage bit``): its bits against
        # the model's own output quantized the same way (cosine of the +1/-1 signs).
        fresh = stores.binary_signs(fresh)
    stored_matrix = np.vstack(stored)
    cosines = np.einsum("ij,ij->i", stored_matrix, fresh) / (
        np.linalg.norm(stored_matrix, axis=1) * np.linalg.norm(fresh, axis=1) + 1e-12
    )
    report.min_cosine = float(cosines.min())
    report.mean_cosine = float(cosines.mean())
    order = np.argsort(cosines)
    report.worst = [(keys[i], round(float(cosines[i]), 6)) for i in order[:WORST_SHOWN]]
    report.below_threshold = int((cosines < report.threshold).sum())
    if report.below_threshold:
        bad = ", ".join(key for key, cosine in report.worst if cosine < report.threshold)
        report.problems.append(
            f"vectors differ: {report.below_threshold} of {report.compared} sampled vectors are "
            f"below cosine {report.threshold} against a fresh embedding (min "
            f"{report.min_cosine:.4f}, e.g. rows {bad}): "
            "stored vectors were altered, or the model computes other vectors"
        )
