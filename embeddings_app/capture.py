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

With ``EMBEDDINGS["CHANGE_CAPTURE"] = "logical"`` there is no trigger: the queue is filled by
``collect``, which reads the keys of the rows inserted or updated from the database's logical
replication slot (``stores.CaptureSlot``, plugin ``pgoutput``) and queues those not fresh (the
drain's collect refreshes them itself when one read finds one batch or fewer). Its own
invariants:

* **No change is lost.** The slot is read with ``peek`` and advanced past a transaction only
  after its rows are written or their entries committed; a collect that dies in between leaves
  the slot where it was, and the next one reads the same changes again (fresh, or queued twice:
  the drain reads a fresh row and encodes nothing).
* **One reader at a time** (an advisory lock); a drain that finds the slot being read drains
  the queue without collecting.
* **A row found fresh is not queued**, and that is safe: the slot returns only committed
  transactions, so the row was read after the change it was named by; a later change is a
  later transaction, read by a later collect.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import UTC, datetime, timedelta
from typing import Any

from django.core.exceptions import FieldDoesNotExist
from django.db import connections, router, transaction
from django.db.utils import load_backend

from . import registry, sources, stores, sync
from .config import get_config
from .fields import VersionedEmbedding
from .models import EmbeddingVersion

__all__ = ["CollectStats", "DrainStats", "capturable", "collect", "drain", "install", "installed",
           "lag_label",
           "own_connection", "prepare", "queue", "queue_label", "queue_stats", "remove",
           "size_label", "sweep_target", "uncapturable_reason"]

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


def _queue_class(mode: str | None) -> type[stores.ChangeQueue]:
    return stores.LogicalChangeQueue if mode == "logical" else stores.ChangeQueue


def queue(field: VersionedEmbedding) -> stores.ChangeQueue | None:
    """The target's change queue when its writes can be captured and capture is on: a
    ``stores.LogicalChangeQueue`` with ``CHANGE_CAPTURE = "logical"``."""
    mode = get_config().capture_mode
    if mode is None or not capturable(field):
        return None
    return _queue_class(mode)(field)


def prepare(field: VersionedEmbedding) -> None:
    """What ``install`` needs done outside any transaction: the logical capture's slot and
    publication (``stores.CaptureSlot.ensure``). Nothing for the trigger."""
    if isinstance(queue(field), stores.LogicalChangeQueue):
        stores.CaptureSlot().ensure()


def install(field: VersionedEmbedding) -> bool:
    """Install (or bring up to date with the declared source columns) ``field``'s capture, in
    the caller's transaction; False when it cannot or should not be captured."""
    change_queue = queue(field)
    if change_queue is None:
        return False
    change_queue.install()
    return True


def installed(field: VersionedEmbedding) -> bool:
    """Is ``field``'s capture installed the way the setting asks?"""
    change_queue = queue(field)
    return change_queue is not None and change_queue.installed()


def remove(field: VersionedEmbedding) -> None:
    stores.ChangeQueue(field).remove()


def queue_stats(field: VersionedEmbedding) -> tuple[int, float | None, int | None] | None:
    """(entries waiting, age of the oldest in seconds or None, bytes of write-ahead log not yet
    collected or None for the trigger) of ``field``'s queue; None when the target has no capture
    installed, either way."""
    if not capturable(field):
        return None
    for change_queue in (stores.ChangeQueue(field), stores.LogicalChangeQueue(field)):
        if change_queue.installed():
            backlog = (stores.CaptureSlot().backlog()
                       if isinstance(change_queue, stores.LogicalChangeQueue) else None)
            return (*change_queue.stats(), backlog)
    return None


def lag_label(depth: int, oldest: float | None, backlog: int | None = None) -> str:
    """``"12 rows, oldest 3.2 s"`` or ``"empty"``: a queue's depth and lag, for people; with
    the logical capture, and the slot's write-ahead log not yet collected:
    ``"empty; 1.2 MB of WAL to collect"``."""
    if not depth:
        label = "empty"
    else:
        assert oldest is not None
        age = f"{oldest:.1f} s" if oldest < 120 else (
            f"{oldest / 60:.0f} min" if oldest < 7200 else f"{oldest / 3600:.1f} h")
        label = f"{depth} row{'s' if depth != 1 else ''}, oldest {age}"
    if backlog:
        label += f"; {size_label(backlog)} of WAL to collect"
    return label


def size_label(size: int) -> str:
    """Bytes for people: ``"1.2 MB"``."""
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


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
    collected: CollectStats | None = None  # the logical capture's collect that came first

    @property
    def written(self) -> int:
        return self.refreshed.embedded + self.refreshed.skipped

    def as_dict(self) -> dict[str, int]:
        result = {"entries": self.entries, "batches": self.batches, "rows_read": self.rows_read,
                  "written": self.written, "conflicted": self.refreshed.conflicted,
                  "failed": self.refreshed.failed}
        if self.collected is not None:
            result.update(collected_changes=self.collected.changes,
                          collected_queued=self.collected.queued,
                          collected_refreshed=self.collected.refreshed.processed)
        return result


@dataclass
class CollectStats:
    changes: int = 0  # inserts and updates of captured tables read from the slot
    transactions: int = 0
    rows_read: int = 0  # rows of the users' tables read to tell the fresh from the stale
    queued: int = 0  # entries appended to the targets' queues
    skipped: bool = False  # another process was reading the slot
    # Rows the collect refreshed itself (``refresh``): a read that found one batch or fewer.
    refreshed: sync.SyncStats = dataclass_field(default_factory=sync.SyncStats)


def own_connection(alias: str) -> Any:
    """A connection of the caller's own (Django's wrapper, the same settings as ``alias``): for
    a drain's claim transactions, which hold the entries' locks while the ordinary connection
    reads, encodes and writes in short transactions of its own, and for the logical capture's
    slot, which is read and created outside the ordinary connection's transactions."""
    settings_dict = dict(connections[alias].settings_dict)
    wrapper = load_backend(settings_dict["ENGINE"]).DatabaseWrapper(settings_dict, alias)
    wrapper.ensure_connection()
    return wrapper


def _claim_connection(field: VersionedEmbedding) -> Any:
    return own_connection(router.db_for_write(field.model))


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
        if isinstance(change_queue, stores.LogicalChangeQueue):
            stats.collected = collect(batch_size=batch_size, max_seconds=max_seconds,
                                      using=claim.alias, reader=claim, refresh=True)
            stats.rows_read += stats.collected.refreshed.processed
            stats.refreshed.add(stats.collected.refreshed)
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


# --- the logical capture's collect ------------------------------------------------------------

PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)  # pgoutput's timestamps: microseconds since then
COLLECT_CHANGES = 10_000  # changes asked of the slot per read (it completes the transaction)


def collect(*, batch_size: int | None = None, max_seconds: float | None = None,
            using: str = "default", fields: Sequence[VersionedEmbedding] | None = None,
            advance: bool = True, reader: Any = None, refresh: bool = False) -> CollectStats:
    """Read the inserts and updates committed since the last collect from the database's slot
    (``stores.CaptureSlot``), queue the keys of the rows that are not fresh for a written version
    of their target, then advance the slot past them. Returns what it did; ``skipped`` when
    another process holds the slot (it collects for everyone).

    ``refresh`` (the drain's): when one read of the slot finds ``batch_size`` stale rows or
    fewer, the collect encodes and writes them itself, by the compare-and-set of every path,
    before it advances the slot, instead of queueing them for a drain batch to read again; a
    larger read is queued, for every worker's drains to share. Either way the slot moves past a
    change only once its row is fresh or queued.

    ``fields`` (default: every target whose capture is the log, by the settings) and ``advance
    = False``: the last collect of a target leaving the log (``stores.ChangeQueue.install``), in
    the caller's transaction, waiting for the slot's reader (``DDL_LOCK_TIMEOUT``); the slot
    stays where it was, so a rolled-back switch loses nothing. ``reader``: a connection of the
    caller's own (``own_connection``, outside any transaction) to read the slot on, left open
    (the drain's claim connection); by default one is opened and closed."""
    stats = CollectStats()
    connection = connections[using]
    slot = stores.CaptureSlot(connection)
    if not slot.exists():
        return stats
    batch_size = batch_size or get_config().batch_size
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    targets = _captured_targets(connection, fields)
    own_reader = reader is None
    reader = own_connection(using) if own_reader else reader
    raw = reader.connection
    locked = False
    try:
        if advance:
            locked = raw.execute(slot.sql_reader_lock, [slot.READER_LOCK]).fetchone()[0]
            if not locked:
                stats.skipped = True
                return stats
        else:
            raw.execute(f"SET lock_timeout = '{stores.DDL_LOCK_TIMEOUT}'")
            raw.execute(slot.sql_reader_wait, [slot.READER_LOCK])
            locked = True
        while True:
            if advance:
                slot.log_running_transactions(raw)
            more, read_to = _collect_once(slot, raw, targets, batch_size, stats, advance,
                                          refresh)
            if read_to is None or not advance:
                break
            raw.execute(slot.sql_advance, [slot.name, read_to])  # after the entries committed
            if not more or (deadline is not None and time.monotonic() >= deadline):
                break
        if stats.changes:
            logger.info("collected %d changes, %d queued", stats.changes, stats.queued)
    finally:
        if locked and not raw.closed:
            raw.execute(slot.sql_reader_unlock, [slot.READER_LOCK])
        if own_reader:
            reader.close()
    if advance and not targets:
        slot.drop_if_unused()  # a slot left by a drop that found it being read
    return stats


def _collect_once(slot: stores.CaptureSlot, raw: Any,
                  targets: dict[tuple[str, str], list[VersionedEmbedding]], batch_size: int,
                  stats: CollectStats, advance: bool,
                  refresh: bool = False) -> tuple[bool, str | None]:
    """One read of up to ``COLLECT_CHANGES`` changes (whole transactions; all of them without
    ``advance``), their rows queued (or refreshed: ``collect``) and committed: (whether the slot
    may hold more, the LSN to advance the slot to, None when nothing was read)."""
    decoder = _Decoder({table: fields[0].model._meta.pk.column for table, fields in targets.items()})
    pending: dict[tuple[str, str], dict[str, datetime]] = {}
    rows_returned = 0
    spilled = False  # a part of this read was queued: the rest is queued too
    with raw.transaction(), raw.cursor(name="embeddings_collect") as cursor:
        cursor.execute(slot.sql_peek, [slot.name, COLLECT_CHANGES if advance else None,
                                       slot.publication])
        while rows := cursor.fetchmany(batch_size):
            rows_returned += len(rows)
            for change in decoder.feed(rows):
                stats.changes += 1
                table, key, committed_at = change
                pending.setdefault(table, {}).setdefault(key, committed_at)
            if sum(map(len, pending.values())) > batch_size:
                _queue_stale(slot.connection, targets, pending, stats)
                pending, spilled = {}, True
    _queue_stale(slot.connection, targets, pending, stats,
                 refresh_up_to=batch_size if refresh and not spilled else 0)
    stats.transactions += decoder.transactions
    return rows_returned >= COLLECT_CHANGES, decoder.last_commit


def _captured_targets(connection: Any, fields: Sequence[VersionedEmbedding] | None,
                      ) -> dict[tuple[str, str], list[VersionedEmbedding]]:
    """The targets whose changes are collected, by their table's (schema, name)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_schema()")
        (schema,) = cursor.fetchone()
    if fields is None:
        fields = [field for field in map(registry.get, registry.all_targets())
                  if isinstance(queue(field), stores.LogicalChangeQueue)]
    by_table: dict[tuple[str, str], list[VersionedEmbedding]] = {}
    for field in fields:
        by_table.setdefault((schema, field.table), []).append(field)
    return by_table


def _queue_stale(connection: Any, targets: dict[tuple[str, str], list[VersionedEmbedding]],
                 pending: dict[tuple[str, str], dict[str, datetime]], stats: CollectStats,
                 refresh_up_to: int = 0) -> None:
    """Queue, for each target of each table, the rows of ``pending`` not fresh for one of its
    written versions (read by primary key, never a scan), in one committed transaction; or,
    when they are ``refresh_up_to`` rows or fewer, encode and write them now."""
    work = []
    for table, changed in pending.items():
        for field in targets.get(table, ()):
            versions = list(EmbeddingVersion.objects.for_target(field.target).written())
            if not versions:
                continue
            pk = field.model._meta.pk
            keys = {pk.to_python(text): committed_at for text, committed_at in changed.items()}
            query, decode = sources.source_query(
                field, versions, field.source_queryset().filter(pk__in=list(keys)).order_by())
            stale = []
            for row in map(decode, query):  # one round trip
                current = field.source_hash(row[1])
                if any(value != current for value in row[2]):
                    stale.append(row)
            stats.rows_read += len(keys)
            if stale:
                work.append((field, versions, stale, [keys[row[0]] for row in stale]))
    if not work:
        return
    if sum(len(stale) for _, _, stale, _ in work) <= refresh_up_to:
        for field, versions, stale, _ in work:  # as a drain batch would, without the queue
            prepared = sync.prepare(field, versions, stale)
            if prepared.pending:
                with transaction.atomic(using=connection.alias):
                    sync.write_prepared(field, prepared)
            sync.record_failures(prepared.stats)
            stats.refreshed.add(prepared.stats)
        return
    with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
        for field, _, stale, queued_at in work:
            stores.LogicalChangeQueue(field).enqueue(cursor, [row[0] for row in stale],
                                                     queued_at)
            stats.queued += len(stale)


class _Decoder:
    """pgoutput's messages (protocol version 1, as ``pg_logical_slot_peek_binary_changes``
    returns them, one per row) to (table, key text, commit time) of each insert and update.
    A relation message names a table and its published columns before its first change; the
    key is the primary key's column, found by name."""

    def __init__(self, key_columns: dict[tuple[str, str], str]) -> None:
        self.key_columns = key_columns  # (schema, table) -> its primary key's column
        self.relations: dict[int, tuple[tuple[str, str], int | None]] = {}
        self.committed_at = PG_EPOCH
        self.last_commit: str | None = None  # the LSN after the last whole transaction
        self.transactions = 0

    def feed(self, rows: Iterable[tuple[str, bytes]]) -> Iterable[tuple[tuple[str, str], str,
                                                                         datetime]]:
        for lsn, data in rows:
            data = bytes(data)
            kind = data[:1]
            if kind == b"B":
                _, micros, _ = struct.unpack_from(">QqI", data, 1)
                self.committed_at = PG_EPOCH + timedelta(microseconds=micros)
            elif kind == b"C":
                self.last_commit = lsn
                self.transactions += 1
            elif kind == b"R":
                self._relation(data)
            elif kind in (b"I", b"U"):
                (relid,) = struct.unpack_from(">I", data, 1)
                table, key_index = self.relations[relid]
                if key_index is None:
                    continue  # a table no target captures (any more)
                offset = 5
                if kind == b"U" and data[offset:offset + 1] in (b"K", b"O"):
                    _, offset = _tuple(data, offset + 1, None)  # the old key or row: not needed
                assert data[offset:offset + 1] == b"N", data[:offset + 1]
                key, _ = _tuple(data, offset + 1, key_index)
                if key is not None:
                    yield table, key, self.committed_at

    def _relation(self, data: bytes) -> None:
        (relid,) = struct.unpack_from(">I", data, 1)
        schema, offset = _cstring(data, 5)
        name, offset = _cstring(data, offset)
        (columns,) = struct.unpack_from(">h", data, offset + 1)  # after the replica identity
        offset += 3
        names = []
        for _ in range(columns):
            column, offset = _cstring(data, offset + 1)  # after the column's flags
            names.append(column)
            offset += 8  # type oid, type modifier
        key_column = self.key_columns.get((schema, name))
        self.relations[relid] = ((schema, name),
                                 names.index(key_column) if key_column in names else None)


def _cstring(data: bytes, offset: int) -> tuple[str, int]:
    end = data.index(b"\0", offset)
    return data[offset:end].decode(), end + 1


def _tuple(data: bytes, offset: int, index: int | None) -> tuple[str | None, int]:
    """The text of column ``index`` of the TupleData at ``offset`` (None: null, unchanged, or no
    index asked) and the offset after it."""
    (columns,) = struct.unpack_from(">h", data, offset)
    offset += 2
    value = None
    for column in range(columns):
        kind = data[offset:offset + 1]
        offset += 1
        if kind in (b"t", b"b"):
            (length,) = struct.unpack_from(">i", data, offset)
            offset += 4
            if column == index:
                value = data[offset:offset + length].decode()
            offset += length
    return value, offset
