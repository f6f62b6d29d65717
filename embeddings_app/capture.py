"""Change capture: every write of a target's source columns is caught by the database and drained
by the sweep, whatever wrote it (docs/backfill.md, "Change capture").

A trigger on the user's table (``stores.ChangeQueue``) appends the key of every row inserted, or
updated in a source column to another value, to the target's queue table, in the writer's own
transaction. ``drain`` takes the oldest entries in batches and refreshes those rows for every
written version through the one compare-and-set path (``sync.prepare`` + ``sync.write_prepared``).

Invariants:

* **No entry is lost.** A drain batch locks its entries (``FOR UPDATE SKIP LOCKED``) in a
  transaction of a connection of its own, reads the rows, encodes and writes them on the
  ordinary connection (short transactions: no lock on the user's table is held while encoding),
  and deletes its entries and commits only after the write committed. A process that dies
  mid-batch (SIGKILL) ends its connection: PostgreSQL rolls the claim back and the entries are
  taken by the next drain.
* **A change during a drain is not lost either.** An entry is deleted only by the drain that
  read its row after the entry was committed; a change committed later has an entry of its own
  (the queue is append-only), which that drain did not take.
* **Two drains never take the same entry** (``SKIP LOCKED``); the same row queued twice may be
  read by two drains at once, and the compare-and-set keeps whichever write is the newer text's.
* **No full scan.** A drain reads only the queued rows, by primary key.

A target whose source is a callable (or a relation) cannot be captured: its sweep stays a full
scan (``check --deploy`` warns, ``embeddings.W120``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

from django.core.exceptions import FieldDoesNotExist
from django.db import connections, router, transaction
from django.db.utils import load_backend

from . import sources, stores, sync
from .config import get_config
from .fields import VersionedEmbedding
from .models import EmbeddingVersion

__all__ = ["DrainStats", "capturable", "drain", "install", "lag_label", "queue", "queue_label",
           "queue_stats", "remove", "sweep_target", "uncapturable_reason"]

logger = logging.getLogger(__name__)


def uncapturable_reason(field: VersionedEmbedding) -> str | None:
    """Why ``field``'s writes cannot be captured by a trigger, or None when they can."""
    if field.source_fields is None:
        return "its source is a callable, which the database cannot evaluate"
    for name in field.source_fields:
        try:
            model_field = field.model._meta.get_field(name)
        except FieldDoesNotExist:
            return f'its source names "{name}", which is not a field of the model'
        if not model_field.concrete or model_field.is_relation or model_field.attname != name:
            return f'its source field "{name}" is not a plain column'
        if model_field.model._meta.db_table != field.table:
            return f'its source field "{name}" is a column of a parent model\'s table'
    return None


def capturable(field: VersionedEmbedding) -> bool:
    return uncapturable_reason(field) is None


def queue(field: VersionedEmbedding) -> stores.ChangeQueue | None:
    """The target's change queue when its writes can be captured and capture is on."""
    if not get_config().change_capture or not capturable(field):
        return None
    return stores.ChangeQueue(field)


def install(field: VersionedEmbedding) -> bool:
    """Install (or bring up to date with the declared source columns) ``field``'s capture, in
    the caller's transaction; False when it cannot or should not be captured."""
    change_queue = queue(field)
    if change_queue is None:
        return False
    change_queue.install()
    return True


def remove(field: VersionedEmbedding) -> None:
    stores.ChangeQueue(field).remove()


def queue_stats(field: VersionedEmbedding) -> tuple[int, float | None] | None:
    """(entries waiting, age of the oldest in seconds or None) of ``field``'s queue; None when
    the target has no capture installed."""
    change_queue = stores.ChangeQueue(field) if capturable(field) else None
    if change_queue is None or not change_queue.installed():
        return None
    return change_queue.stats()


def lag_label(depth: int, oldest: float | None) -> str:
    """``"12 rows, oldest 3.2 s"`` or ``"empty"``: a queue's depth and lag, for people."""
    if not depth:
        return "empty"
    assert oldest is not None
    age = f"{oldest:.1f} s" if oldest < 120 else (
        f"{oldest / 60:.0f} min" if oldest < 7200 else f"{oldest / 3600:.1f} h")
    return f"{depth} row{'s' if depth != 1 else ''}, oldest {age}"


def queue_label(field: VersionedEmbedding) -> str:
    """The target's change capture in a few words (the admin's column)."""
    if not capturable(field):
        return "not captured (full scans)"
    stats = queue_stats(field)
    return "not installed (full scans)" if stats is None else lag_label(*stats)


@dataclass
class DrainStats:
    entries: int = 0  # queue entries taken and deleted
    batches: int = 0
    rows_read: int = 0  # rows of the user's table read (each once per batch that queued it)
    emptied: bool = True  # False: stopped by its time budget with entries left
    refreshed: sync.SyncStats = dataclass_field(default_factory=sync.SyncStats)

    @property
    def written(self) -> int:
        return self.refreshed.embedded + self.refreshed.skipped

    def as_dict(self) -> dict[str, int]:
        return {"entries": self.entries, "batches": self.batches, "rows_read": self.rows_read,
                "written": self.written, "conflicted": self.refreshed.conflicted,
                "failed": self.refreshed.failed}


def _claim_connection(field: VersionedEmbedding) -> Any:
    """A connection of the drain's own (Django's wrapper, the same settings as the model's
    database) for the claim transactions: they hold the entries' locks while the ordinary
    connection reads, encodes and writes in short transactions of its own."""
    alias = router.db_for_write(field.model)
    settings_dict = dict(connections[alias].settings_dict)
    wrapper = load_backend(settings_dict["ENGINE"]).DatabaseWrapper(settings_dict, alias)
    wrapper.ensure_connection()
    return wrapper


def drain(field: VersionedEmbedding, *, batch_size: int | None = None,
          max_seconds: float | None = None) -> DrainStats:
    """Refresh the rows queued for ``field`` until its queue is empty (or ``max_seconds`` have
    passed: the entries left wait for the next drain). Returns what it did."""
    change_queue = queue(field)
    stats = DrainStats()
    if change_queue is None or not change_queue.installed():
        return stats  # nothing captured (yet): the sweep reads the table instead
    batch_size = batch_size or get_config().batch_size
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    claim = _claim_connection(field)
    try:
        while _drain_batch(field, change_queue, claim, batch_size, stats):
            if deadline is not None and time.monotonic() >= deadline:
                stats.emptied = False
                break
    finally:
        claim.close()
    if stats.entries:
        logger.info("drained %d entries of %s: %s", stats.entries, field.target, stats.as_dict())
    return stats


def _drain_batch(field: VersionedEmbedding, change_queue: stores.ChangeQueue, claim: Any,
                 batch_size: int, stats: DrainStats) -> bool:
    """One batch: claim, refresh, delete. False when there was nothing left to claim."""
    raw = claim.connection  # psycopg's: its transaction() opens one in autocommit mode
    with raw.transaction(), raw.cursor() as cursor:
        entries = change_queue.claim(cursor, batch_size)
        if not entries:
            return False
        keys = list(dict.fromkeys(key for _, key in entries))  # a row queued twice: read once
        versions = list(EmbeddingVersion.objects.for_target(field.target).written())
        if versions:
            batch = _refresh(field, versions, keys, batch_size)
            stats.rows_read += batch.processed
            stats.refreshed.add(batch)
        change_queue.delete(cursor, [entry for entry, _ in entries])
    stats.entries += len(entries)
    stats.batches += 1
    return True


def _refresh(field: VersionedEmbedding, versions: list[EmbeddingVersion], keys: list[Any],
             batch_size: int) -> sync.SyncStats:
    """Read the rows of ``keys`` (by primary key) with their stored hashes, encode those that
    are not fresh and write them by compare-and-set: the path of every other write."""
    stats = sync.SyncStats()
    rows = field.source_queryset().filter(pk__in=keys)
    for page, _ in sources.iter_source_pages(field, versions, rows, batch_size):
        prepared = sync.prepare(field, versions, page)
        if prepared.pending:
            with transaction.atomic():
                sync.write_prepared(field, prepared)
        sync.record_failures(prepared.stats)
        stats.add(prepared.stats)
    return stats


def sweep_target(field: VersionedEmbedding, *, full_scan: bool | None = None) -> int:
    """The sweep of one target: drain its queue; read the whole table only where its writes are
    not captured, or when ``full_scan`` (default ``EMBEDDINGS["SWEEP_FULL_SCAN"]``) asks for
    the safety net. Returns the rows written."""
    if full_scan is None:
        full_scan = get_config().sweep_full_scan
    change_queue = queue(field)
    if change_queue is None or not change_queue.installed():
        return sync.sync_queryset(field)
    written = drain(field).written
    if full_scan:
        written += sync.sync_queryset(field)
    return written
