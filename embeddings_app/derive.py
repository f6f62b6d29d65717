"""``embeddings derive``: a version computed from another version's vectors, without running the
model over the table (docs/cutover.md, "Deriving a version").

Kinds: ``dimensions=N`` (a Matryoshka model truncated to its first N dimensions, re-normalized),
``storage="halfvec"`` (half precision) and ``storage="bit"`` (binary quantization). A derived
version is a version of a model alias that computes the same vectors itself (the same model files
and settings with ``truncate_dim`` N, or ``"storage": "halfvec"``; a bit version keeps the
parent's alias, and its store quantizes every vector written with pgvector's ``binary_quantize``
in SQL): so saves, queries (embedded by that alias: the query is truncated, or quantized in SQL,
the same way), ``verify`` (the derived vectors against the model's own truncated or quantized
output) and ``probe`` treat it as any version. Only its creation is different, and a bit
version's search: its Hamming index gives ``EMBEDDINGS["RERANK_OVERSAMPLING"]`` x k candidates, re-ranked
by the parent's exact cosine distance (``VersionStore.search_queryset``).

Invariants:

* nothing is created unless the alias matches the parent's model, revision and encode settings
  but for the derivation, and a random sample of derived vectors matches the alias's own output
  (``adopt.check_sample``; refused with the cosines otherwise);
* a parent vector is derived only if it is fresh (its stored source hash is the hash of the
  row's current text), and written by the compare-and-set of every write; the other rows are
  left missing and embedded by the backfill that ``embeddings derive`` runs next;
* the lineage (parent and kind) is recorded on the version (``derived_from``, ``derivation``)
  and in its history; a bit version's parent cannot be dropped while the child is not
  (``lifecycle.dependent_children``), and the child is not activated while the parent is not
  complete and written (``lifecycle.rerank_parent_problems``);
* refusals name no command-line flag: an error about one argument names it in ``option``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from . import adopt, capture, lifecycle, limits, probes, registry, stores
from .config import get_config
from .exceptions import Refused
from .models import WRITTEN_STATES, EmbeddingVersion

__all__ = ["ParentVectors", "derive", "matching_alias"]

# Encode settings that may differ between a parent and its derived version.
DERIVED_SETTINGS = ("truncate_dim", "storage", "dimensions")


class ParentVectors:
    """The parent version's vectors, transformed: ``read`` and ``sample`` as
    ``stores.ExistingVectors``; ``last_hashes`` are the parent's stored source hashes of the
    last read (``adopt`` takes a vector only where it is the hash of the row's current text)."""

    def __init__(self, parent: EmbeddingVersion, dimensions: int | None) -> None:
        self.parent = parent
        self.dimensions = dimensions
        self.last_hashes: dict[Any, bytes | None] = {}

    def transform(self, vector: np.ndarray) -> np.ndarray:
        if self.dimensions is None:
            return vector
        cut = vector[:self.dimensions]
        norm = float(np.linalg.norm(cut))
        return (cut / norm if norm else cut).astype(np.float32)

    def describe(self) -> str:
        return str(self.parent)

    def read(self, pks: list[Any]) -> dict[Any, np.ndarray]:
        found = self.parent.store.read_vectors(pks)
        self.last_hashes = {pk: source_hash for pk, (_, source_hash) in found.items()}
        return {pk: self.transform(vector) for pk, (vector, _) in found.items()}

    def sample(self, size: int) -> dict[Any, np.ndarray]:
        return {pk: self.transform(stores.as_array(vector))
                for pk, vector, _ in self.parent.store.sample(size)}

    def count(self) -> int:
        return self.parent.store.vector_count()


def matching_alias(parent: EmbeddingVersion, dimensions: int | None, storage: str) -> str:
    """The configured alias computing ``parent``'s vectors derived so; refused, naming what to
    add, when there is none."""
    wanted = {k: v for k, v in parent.encode_settings.items() if k not in DERIVED_SETTINGS}
    found = []
    for alias, spec in get_config().models.items():
        settings = {k: v for k, v in spec.encode_settings().items() if k not in DERIVED_SETTINGS}
        if (spec.model, spec.revision) != (parent.model_name, parent.revision):
            continue
        if settings != wanted or (spec.storage or "vector") != storage:
            continue
        if (spec.truncate_dim or None) != (dimensions or parent.encode_settings.get(
                "truncate_dim") or None):
            continue
        found.append(alias)
    if not found:
        extra = {**({"truncate_dim": dimensions} if dimensions else {}),
                 **({"storage": storage} if storage != "vector" else {})}
        raise Refused(
            f"No model alias computes {parent}'s vectors with {extra}: add one to "
            f'EMBEDDINGS["MODELS"] with the same "model" ({parent.model_name}) and "revision" '
            f"({parent.revision}) as alias {parent.model_alias} and {extra}, or name it.",
            option="alias")
    return sorted(found)[0]


def derive(target: str, version_name: str, parent_name: str, *, dimensions: int | None = None,
           storage: str | None = None, alias: str | None = None, layout: str | None = None,
           sample: int | None = None, batch_size: int | None = None, actor: str = "",
           progress: Callable[[int], Any] | None = None,
           ) -> tuple[EmbeddingVersion, adopt.AdoptReport]:
    """Create ``version_name`` from ``parent_name``'s vectors (see the module docstring). The
    version is ``new`` when this returns; ``embeddings derive`` then backfills the rows the parent
    could not give (missing or stale there)."""
    field_ = registry.get(target)
    target = field_.target
    config = get_config()
    parent = EmbeddingVersion.objects.get_version(target, parent_name)
    lifecycle.check_version_name(target, version_name)
    if storage not in (None, "vector", "halfvec", "bit"):
        raise Refused(f'The derived storage must be halfvec, bit (or vector), not "{storage}".',
                      option="storage")
    if parent.storage == "bit":
        raise Refused(f"{parent} is binary-quantized: derive from a full-precision version.")
    if parent.chunk_tokens:
        raise Refused(f"{parent} is chunked (one vector per chunk, not per row); derive from a "
                      "whole-row version, or add a chunked version of the model you want.")
    if storage == "bit" and dimensions is not None:
        raise Refused("A bit version keeps its parent's dimensions (its candidates are re-ranked "
                      "by the parent's vectors): derive the bits without dimensions, or from a "
                      "version of that many dimensions.", option="dimensions")
    if dimensions is None and storage in (None, parent.storage):
        raise Refused(f"Nothing to derive: give the dimensions to keep (fewer than {parent}'s "
                      f"{parent.dimensions}) or a storage (halfvec or bit).", option="dimensions")
    if dimensions is not None:
        limits.integer("The derived dimensions", dimensions, 1, int(parent.dimensions) - 1,
                       "dimensions")
    if parent.state not in WRITTEN_STATES:
        raise Refused(f"{parent} is {parent.state}: its vectors are not kept fresh; derive from "
                      "a written (ready, active or standby) version.")
    sample = config.verify_sample if sample is None else sample
    limits.integer("The sample", sample, 1, limits.MAX_VERIFY_SAMPLE, "sample")
    page_size = config.batch_size if batch_size is None else batch_size
    limits.integer("The batch size", page_size, 1, limits.MAX_BATCH_SIZE, "batch_size")
    storage = storage or parent.storage
    if storage == "bit":
        # The parent's own alias computes the vectors; the store quantizes them in SQL.
        alias = alias or parent.model_alias
        spec, encoder, storage_type = lifecycle.load_new_model(alias)
        if encoder.fingerprint != parent.fingerprint:
            raise Refused(f"Model alias {alias} is not the model and settings of {parent} "
                          f"(fingerprint {encoder.fingerprint[:12]}, not "
                          f"{parent.fingerprint[:12]}): a bit version's bits and its re-rank "
                          "need the parent's model; name its alias.", option="alias")
        storage_type = "bit"
    else:
        alias = alias or matching_alias(parent, dimensions, storage)
        spec, encoder, storage_type = lifecycle.load_new_model(alias)
    expected = dimensions or parent.dimensions
    if encoder.dimensions != expected or storage_type != storage:
        raise Refused(f"Model alias {alias} computes {storage_type}({encoder.dimensions}) "
                      f"vectors, not the {storage}({expected}) derived from {parent}; name "
                      "another alias.", option="alias")
    source = ParentVectors(parent, dimensions)
    threshold = probes.threshold_for(spec)
    check = adopt.check_sample(field_, source, encoder, sample, threshold)
    if not check.sampled:
        raise Refused(f"{parent} has no vectors to derive from; backfill it first.")
    if not check.passed:
        raise Refused(f"The vectors derived from {parent} do not match model {alias}'s own "
                      f"output: {check.summary()}. Nothing was derived; check that the model is "
                      "trained for truncation (Matryoshka) and the aliases' settings.")
    kind = ", ".join(filter(None, [dimensions and f"first {dimensions} dimensions, "
                                                 "re-normalized",
                                   storage != parent.storage and storage]))
    derivation = ", ".join(filter(None, [dimensions and f"{dimensions} dims",
                                         storage != parent.storage and storage]))
    store_class = stores.store_class(layout or config.layout)
    store_class.check_new(field_, version_name)
    probe_texts, probe_vectors = probes.initial(encoder, target)
    capture.prepare(field_)  # the logical capture's slot, outside the version's transaction
    with lifecycle.locked_versions(target) as versions:
        lifecycle.check_name_free(target, version_name, versions)
        store_class.check_new(field_, version_name)
        version = lifecycle.create_version(
            target, version_name, versions, spec=spec, encoder=encoder, storage=storage,
            layout=store_class.layout, names=store_class.names(field_, version_name),
            probe_texts=probe_texts, probe_vectors=probe_vectors, actor=actor,
            derived_from=parent, derivation=derivation,
            note=f"derived from {parent} ({kind}) as alias {alias}, without the model "
                 f"({check.summary()})")
        version.store.add()
    report = adopt.AdoptReport(version=str(version), source=str(parent), in_place=False,
                               check=check, rows_with_vector=source.count(), verb="Derived")
    adopt.record(version, field_, source, None, threshold, page_size, report, progress)
    return version, report
