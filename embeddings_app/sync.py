"""Bring rows' vectors up to date: the one path used by backfill batches, dual-writes on save and
``sync(queryset)``.

A row is *fresh* for a version when its stored source hash equals the hash of its current source
text. Only rows that are not fresh are encoded. Encoding runs outside any lock; the write then
locks the rows, re-reads their source and writes only where the source is still the one that was
encoded (compare-and-set on the source hash), so a slow batch never overwrites a newer vector.

Per-row policy (docs/backfill.md):

* empty source (``""``, whitespace, or ``None`` from a callable): no vector (NULL), the source hash
  is recorded so the row counts as covered; counted as *skipped*. Search leaves the row out.
* over-long source: the tokenizer truncates it to the model's ``max_seq_length`` tokens, as every
  sentence-transformers encode does; embedded normally.
* a row the encoder rejects (e.g. lone surrogates from a callable source): the batch is re-encoded
  row by row to isolate it; the row gets no vector and no hash (so it stays *missing* and a
  resumed backfill retries it), is counted as *failed* and recorded (``RowFailure``: row key and
  error). The rest of the batch is written.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from django.db import models, transaction

from . import encoders, storage
from .models import EmbeddingVersion

if TYPE_CHECKING:
    from .fields import VersionedEmbedding

MAX_RECORDED_ERRORS = 1000  # per batch; counts stay exact beyond it

logger = logging.getLogger(__name__)


@dataclass
class SyncStats:
    processed: int = 0  # rows read and checked
    embedded: int = 0  # rows encoded and written
    skipped: int = 0  # empty source: hash recorded, vector left NULL
    conflicted: int = 0  # source changed between read and write: left to the newer writer
    failed: int = 0
    # (version id, row key, error) of every failed row
    errors: list[tuple[int, Any, str]] = field(default_factory=list)

    def add(self, other: SyncStats) -> None:
        self.processed += other.processed
        self.embedded += other.embedded
        self.skipped += other.skipped
        self.conflicted += other.conflicted
        self.failed += other.failed
        self.errors.extend(other.errors[: MAX_RECORDED_ERRORS - len(self.errors)])


@dataclass
class _Pending:
    version: EmbeddingVersion
    rows: list[tuple[Any, bytes, np.ndarray | None]]  # (pk, source hash, vector or None)


def refresh_rows(
    field: VersionedEmbedding,
    versions: Sequence[EmbeddingVersion],
    instances: Sequence[models.Model],
) -> SyncStats:
    """Re-embed, for each of ``versions``, those of ``instances`` that are not fresh."""
    stats = SyncStats(processed=len(instances))
    if not versions or not instances:
        return stats
    encoders_by_version = {version.pk: encoders.for_version(version) for version in versions}
    # Keys as the database returns them: an instance created with a str UUID has a str pk.
    to_key = field.model._meta.pk.to_python
    texts = {to_key(obj.pk): field.source_text(obj) for obj in instances}
    hashes = {pk: field.source_hash(text) for pk, text in texts.items()}
    stored = storage.stored_hashes(field, versions, list(texts))

    pending = []
    for index, version in enumerate(versions):
        stale = [pk for pk, stored_row in stored.items() if stored_row[index] != hashes[pk]]
        if not stale:
            continue
        to_encode = [pk for pk in stale if texts[pk].strip()]
        by_pk, failed = _encode_isolating(encoders_by_version[version.pk], to_encode, texts)
        for pk, error in failed.items():
            stats.failed += 1
            if len(stats.errors) < MAX_RECORDED_ERRORS:
                stats.errors.append((version.pk, pk, error))
        rows = [(pk, hashes[pk], by_pk.get(pk)) for pk in stale if pk not in failed]
        if rows:
            pending.append(_Pending(version, rows))
    if pending:
        _write_guarded(field, pending, stats)
    return stats


def _encode_isolating(
    encoder: encoders.Encoder, pks: list[Any], texts: dict[Any, str]
) -> tuple[dict[Any, np.ndarray], dict[Any, str]]:
    """Encode the rows of ``pks`` in one call; if the encoder rejects the batch, encode them one
    by one so that only the rows it rejects fail. Returns (vectors by pk, error by failed pk)."""
    if not pks:
        return {}, {}
    try:
        vectors = encoder.encode_documents([texts[pk] for pk in pks])
        return dict(zip(pks, vectors, strict=True)), {}
    except Exception as exc:  # the encoder's error types are many (tokenizer, torch, ...)
        if len(pks) == 1:
            return {}, {pks[0]: f"{type(exc).__name__}: {exc}"[:2000]}
        logger.warning("encoding %d rows failed (%s); isolating the failing rows",
                       len(pks), type(exc).__name__)
    by_pk: dict[Any, np.ndarray] = {}
    failed: dict[Any, str] = {}
    for pk in pks:
        one, error = _encode_isolating(encoder, [pk], texts)
        by_pk.update(one)
        failed.update(error)
    return by_pk, failed


def record_failures(stats: SyncStats, run_id: int | None = None) -> None:
    """Record the rows of ``stats`` that could not be embedded (for ``status`` and the admin)."""
    from .models import RowFailure

    if stats.errors:
        RowFailure.objects.bulk_create([
            RowFailure(version_id=version_id, run_id=run_id, row_key=str(pk)[:200], error=error)
            for version_id, pk, error in stats.errors
        ])


def _write_guarded(field: VersionedEmbedding, pending: list[_Pending], stats: SyncStats) -> None:
    pks = sorted({pk for item in pending for pk, _, _ in item.rows}, key=_sort_key)
    with transaction.atomic():
        # Lock in primary-key order (no deadlock between batches) and re-read the source.
        current = {
            obj.pk: field.source_hash(field.source_text(obj))
            for obj in field.source_queryset().select_for_update().filter(pk__in=pks).order_by("pk")
        }
        for item in pending:
            still_current = [row for row in item.rows if current.get(row[0]) == row[1]]
            stats.conflicted += len(item.rows) - len(still_current)
            storage.write_vectors(field, item.version, still_current)
            stats.skipped += sum(1 for row in still_current if row[2] is None)
            stats.embedded += sum(1 for row in still_current if row[2] is not None)


def _sort_key(pk: Any) -> Any:
    return str(pk) if not isinstance(pk, int) else pk


def iter_pages(queryset: models.QuerySet, page_size: int) -> Iterator[list[models.Model]]:
    """Walk ``queryset`` by primary key, one page at a time (keyset pagination, never OFFSET)."""
    queryset = queryset.order_by("pk")
    last = None
    while True:
        page_qs = queryset if last is None else queryset.filter(pk__gt=last)
        page = list(page_qs[:page_size])
        if not page:
            return
        yield page
        last = page[-1].pk


def sync_queryset(
    field: VersionedEmbedding,
    queryset: models.QuerySet | None = None,
    versions: Iterable[EmbeddingVersion] | None = None,
    page_size: int | None = None,
) -> int:
    """Re-embed every stale row of ``queryset`` for every written version; returns rows written."""
    from .config import get_config

    versions = list(versions) if versions is not None else list(
        EmbeddingVersion.objects.for_target(field.target).written()
    )
    if not versions:
        return 0
    base = field.source_queryset()
    if queryset is not None:
        base = base.filter(pk__in=queryset.values("pk"))
    stats = SyncStats()
    for page in iter_pages(base, page_size or get_config().batch_size):
        page_stats = refresh_rows(field, versions, page)
        record_failures(page_stats)
        stats.add(page_stats)
    return stats.embedded + stats.skipped


def count_stale(field: VersionedEmbedding, versions: Sequence[EmbeddingVersion]) -> list[int]:
    """Per version: rows embedded from a source text that has changed since (a full read)."""
    return [len(stale) for _, stale in unfresh_rows(field, versions)]


def unfresh_rows(
    field: VersionedEmbedding, versions: Sequence[EmbeddingVersion]
) -> list[tuple[set[Any], set[Any]]]:
    """Per version: (keys of rows without a vector or hash, keys of stale rows), in one read of
    the table."""
    from .config import get_config

    result: list[tuple[set[Any], set[Any]]] = [(set(), set()) for _ in versions]
    if not versions:
        return result
    for page in iter_pages(field.source_queryset(), get_config().batch_size * 8):
        stored = storage.stored_hashes(field, versions, [obj.pk for obj in page])
        for obj in page:
            values = stored.get(obj.pk)
            if values is None:
                continue  # deleted since the page was read
            current = field.source_hash(field.source_text(obj))
            for (missing, stale), value in zip(result, values, strict=True):
                if value is None:
                    missing.add(obj.pk)
                elif value != current:
                    stale.add(obj.pk)
    return result
