"""Bring rows' vectors up to date: the one path used by backfill batches, dual-writes on save and
``sync(queryset)``.

A row is *fresh* for a version when its stored source hash equals the hash of its current source
text. Only rows that are not fresh are encoded. Encoding runs outside any lock; the write then
locks the rows, re-reads their source and writes only where the source is still the one that was
encoded (compare-and-set on the source hash), so a slow batch never overwrites a newer vector.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from django.db import models, transaction

from . import encoders, storage
from .models import EmbeddingVersion

if TYPE_CHECKING:
    from .fields import VersionedEmbedding

MAX_RECORDED_ERRORS = 20


@dataclass
class SyncStats:
    processed: int = 0  # rows read and checked
    embedded: int = 0  # rows encoded and written
    skipped: int = 0  # empty source: hash recorded, vector left NULL
    conflicted: int = 0  # source changed between read and write: left to the newer writer
    failed: int = 0
    errors: list[tuple[Any, str]] = field(default_factory=list)  # (row key, error)

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
    texts = {obj.pk: field.source_text(obj) for obj in instances}
    hashes = {pk: field.source_hash(text) for pk, text in texts.items()}
    stored = storage.stored_hashes(field, versions, list(texts))

    pending = []
    for index, version in enumerate(versions):
        stale = [pk for pk, stored_row in stored.items() if stored_row[index] != hashes[pk]]
        if not stale:
            continue
        to_encode = [pk for pk in stale if texts[pk].strip()]
        vectors = encoders_by_version[version.pk].encode_documents([texts[pk] for pk in to_encode])
        by_pk: dict[Any, np.ndarray | None] = dict(zip(to_encode, vectors, strict=True))
        pending.append(_Pending(version, [(pk, hashes[pk], by_pk.get(pk)) for pk in stale]))
    if pending:
        _write_guarded(field, pending, stats)
    return stats


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
    base = field.source_queryset()
    if queryset is not None:
        base = base.filter(pk__in=queryset.values("pk"))
    stats = SyncStats()
    for page in iter_pages(base, page_size or get_config().batch_size):
        stats.add(refresh_rows(field, versions, page))
    return stats.embedded + stats.skipped


def count_stale(field: VersionedEmbedding, versions: Sequence[EmbeddingVersion]) -> list[int]:
    """Per version: rows embedded from a source text that has changed since (a full read)."""
    from .config import get_config

    counts = [0] * len(versions)
    if not versions:
        return counts
    for page in iter_pages(field.source_queryset(), get_config().batch_size * 8):
        stored = storage.stored_hashes(field, versions, [obj.pk for obj in page])
        for obj in page:
            current = field.source_hash(field.source_text(obj))
            for index, value in enumerate(stored.get(obj.pk, ())):
                if value is not None and value != current:
                    counts[index] += 1
    return counts
