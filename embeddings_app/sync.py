"""Bring rows' vectors up to date: the one path used by backfill batches, dual-writes on save and
``sync(queryset)``.

A row is *fresh* for a version when its stored source hash equals the hash of its current source
text. Only rows that are not fresh are encoded. Encoding runs outside any lock; the write then
locks the rows (all of them at once, in key order: two writes never deadlock), re-reads the
source of those changed since they were read and writes only where the source is still the one
that was encoded (compare-and-set on the source hash), so a slow batch never overwrites a newer
vector.

Per-row policy (docs/backfill.md):

* empty source (``""``, whitespace, or ``None`` from a callable): no vector (NULL), the source hash
  is recorded so the row counts as covered; counted as *skipped*. Search leaves the row out.
* over-long source: the tokenizer truncates it to the model's ``max_seq_length`` tokens, as every
  sentence-transformers encode does; embedded normally.
* a provider failing as a whole (``ProviderError``: an API outage after its retries, a bad key) is
  no row's fault: it propagates, nothing is written or marked failed, and the batch is retried.
* a row the encoder rejects (e.g. lone surrogates from a callable source, an API's 400 for one
  input): the batch is re-encoded
  row by row to isolate it; the row gets no vector and no hash (so it stays *missing* and a
  resumed backfill retries it), is counted as *failed* and recorded (``RowFailure``: row key and
  error). The rest of the batch is written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from django.db import models, transaction
from django.utils import timezone

from . import chunking, encoders, sources, stores
from .config import get_config
from .exceptions import PrecisionMismatch, ProviderError
from .models import EmbeddingVersion, RowFailure, State, VersionEvent
from .sources import EmbeddingSource, SourceRow

MAX_RECORDED_ERRORS = 1000  # per batch; counts stay exact beyond it

logger = logging.getLogger(__name__)


@dataclass
class SyncStats:
    processed: int = 0  # rows read and checked
    embedded: int = 0  # rows encoded and written
    skipped: int = 0  # empty source: hash recorded, vector left NULL
    conflicted: int = 0  # source changed between read and write: left to the newer writer
    failed: int = 0
    chunks_encoded: int = 0  # chunks of chunked versions encoded (the others kept their vectors)
    # (version id, row key, error) of every failed row
    errors: list[tuple[int, Any, str]] = field(default_factory=list)

    def add(self, other: SyncStats) -> None:
        self.processed += other.processed
        self.embedded += other.embedded
        self.skipped += other.skipped
        self.conflicted += other.conflicted
        self.failed += other.failed
        self.chunks_encoded += other.chunks_encoded
        self.errors.extend(other.errors[: MAX_RECORDED_ERRORS - len(self.errors)])


@dataclass
class _Pending:
    version: EmbeddingVersion
    # (pk, source hash, vector or None); a chunked version's: its chunks (chunking.ChunkRow)
    rows: list[tuple[Any, bytes, Any]]


@dataclass
class Prepared:
    """Rows encoded outside any transaction, waiting for their compare-and-set write."""

    stats: SyncStats
    pending: list[_Pending]
    # pk -> the row version (xmin) the encoded text was read from, where known
    read_versions: dict[Any, str] = field(default_factory=dict)


def refresh_rows(
    field: EmbeddingSource,
    versions: Sequence[EmbeddingVersion],
    instances: Sequence[models.Model],
) -> SyncStats:
    """Re-embed, for each of ``versions``, those of ``instances`` that are not fresh."""
    if not versions or not instances:
        return SyncStats(processed=len(instances))
    # Keys as the database returns them: an instance created with a str UUID has a str pk.
    to_key = field.model._meta.pk.to_python
    texts = {to_key(obj.pk): field.source_text(obj) for obj in instances}
    with transaction.atomic():
        versions = still_written(field, versions)  # retired or dropped since they were read
        stored = stores.stored_hashes(field, versions, list(texts))
    if not versions:
        return SyncStats(processed=len(instances))
    # A row deleted meanwhile has no stored hashes: it is processed, never written.
    rows = [(pk, text, stored[pk], None) for pk, text in texts.items() if pk in stored]
    prepared = prepare(field, versions, rows, dual_write=True)
    prepared.stats.processed = len(instances)
    if prepared.pending:
        with transaction.atomic():
            write_prepared(field, prepared)
    return prepared.stats


def still_written(field: EmbeddingSource,
                  versions: Sequence[EmbeddingVersion]) -> list[EmbeddingVersion]:
    """Those of ``versions`` not retired or dropped since they were read, read in the caller's
    transaction after locking ``field``'s table against DDL (``ROW EXCLUSIVE``, what the write
    takes anyway).

    A version's storage exists for as long as the caller's transaction lasts: ``drop`` commits
    the ``dropped`` state before it removes it, and waits for this lock to do so (dropping its
    columns; or, for a table of the version's own, dropping that table, which locks this table
    exclusively to remove the foreign key); ``add`` commits a version and its storage together."""
    assert transaction.get_connection().in_atomic_block, "still_written needs a transaction"
    if not versions:
        return []
    with transaction.get_connection().cursor() as cursor:
        cursor.execute(f"LOCK TABLE {stores.qn(field.table)} IN ROW EXCLUSIVE MODE")
    written = set(EmbeddingVersion.objects.filter(pk__in=[v.pk for v in versions]).exclude(
        state__in=(State.RETIRED, State.DROPPED)).values_list("pk", flat=True))
    return [version for version in versions if version.pk in written]


def prepare(field: EmbeddingSource, versions: Sequence[EmbeddingVersion],
            rows: Sequence[SourceRow], *, dual_write: bool = False) -> Prepared:
    """Encode, for each of ``versions``, the ``rows`` whose stored hash is not their source's
    (outside any transaction: this is the slow part). ``write_prepared`` writes them.

    ``dual_write`` (a save's re-embedding): a non-active version whose model cannot be loaded
    is marked unwritable (``mark_unwritable``) and left out instead of failing the save; a
    version already marked is left out. The active version's model failing still fails."""
    stats = SyncStats(processed=len(rows))
    pending: list[_Pending] = []
    if not versions or not rows:
        return Prepared(stats, pending)
    # Every version's model is checked (fingerprint) even when none of its rows is stale.
    encoders_by_version = {}
    for version in versions:
        if dual_write and version.write_error and version.state != State.ACTIVE:
            continue  # not written until a backfill finds its model loading again
        try:
            encoders_by_version[version.pk] = encoders.for_version(version)
        except PrecisionMismatch:
            raise  # this process's precision, not the version's fault (docs/devices.md)
        except Exception as exc:  # the model's files, its folder, its library: many types
            if not dual_write or version.state == State.ACTIVE:
                raise
            mark_unwritable(version, f"{type(exc).__name__}: {exc}")
    texts = {pk: text for pk, text, _, _ in rows}
    hashes = {pk: field.source_hash(text) for pk, text, _, _ in rows}
    for index, version in enumerate(versions):
        if version.pk not in encoders_by_version:
            continue
        stale = [pk for pk, _, stored_row, _ in rows if stored_row[index] != hashes[pk]]
        if not stale:
            continue
        to_encode = [pk for pk in stale if texts[pk].strip()]
        encoder = encoders_by_version[version.pk]
        if version.chunk_tokens:  # a chunked version: only the chunks not stored yet are encoded
            by_pk, failed, encoded = chunking.plan_rows(
                version, encoder, stores.store_for(version, field), to_encode, texts,
                lambda keys, by_key, encoder=encoder: _encode_isolating(encoder, keys, by_key))
            stats.chunks_encoded += encoded
        else:
            by_pk, failed = _encode_isolating(encoder, to_encode, texts)
        for pk, error in failed.items():
            stats.failed += 1
            if len(stats.errors) < MAX_RECORDED_ERRORS:
                stats.errors.append((version.pk, pk, error))
        written = [(pk, hashes[pk], by_pk.get(pk)) for pk in stale if pk not in failed]
        if written:
            pending.append(_Pending(version, written))
    read_versions = {pk: xmin for pk, _, _, xmin in rows if xmin is not None}
    return Prepared(stats, pending, read_versions)


def mark_unwritable(version: EmbeddingVersion, reason: str) -> None:
    """Record that a non-active version can no longer be written (its model fails to load):
    from then on saves leave it out, it is no rollback target (``rollback`` refuses it with
    the reason), and ``status``, the admin and ``check --deploy`` report it. A ``backfill`` that
    finds its model loading again clears the mark. Recorded when the saving transaction commits
    (after the save's own locks are released), once."""
    logger.warning("%s is no longer written: %s", version, reason)
    version.write_error = reason[:2000]

    def record() -> None:
        marked = EmbeddingVersion.objects.filter(pk=version.pk, write_error="").exclude(
            state__in=(State.ACTIVE, State.RETIRED, State.DROPPED)).update(
            write_error=reason[:2000], write_error_at=timezone.now())
        if marked:
            VersionEvent.objects.create(version=version, from_state=version.state,
                                        to_state=version.state, actor="dual-write",
                                        note=f"not written any more: {reason}"[:2000])

    transaction.on_commit(record)


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
    except (ProviderError, *encoder.transient_errors):
        raise  # the provider failed as a whole (an outage, a bad key): no row is to blame
    except Exception as exc:  # the encoder's error types are many (tokenizer, torch, HTTP 400)
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
    if stats.errors:
        RowFailure.objects.bulk_create([
            RowFailure(version_id=version_id, run_id=run_id, row_key=str(pk)[:200], error=error)
            for version_id, pk, error in stats.errors
        ])


def write_prepared(field: EmbeddingSource, prepared: Prepared) -> set[str]:
    """The compare-and-set write of ``prepare``'s rows, in the caller's transaction: a row is
    written only while its source is still the text that was encoded. Counts into
    ``prepared.stats``.

    Every row it writes is locked first, all at once, in key order (``stores.lock_rows``), and
    only then written, version after version: two writes of overlapping rows queue for the
    first of them instead of deadlocking (rows locked by several statements, or in the order a
    plan met them, did: a write holding a version's rows waited for a row another write held
    while that one waited for them). A row whose version (``xmin``) is still the one read is
    written as it is; the rest (changed since the read, or texts not read from the table, as in
    a dual-write) have their source read again under the lock, and those whose hash is still
    the encoded text's are written.

    Returns the transaction ids (xmin, as text) of the rows written: this transaction's, or its
    savepoint's."""
    if not prepared.pending:
        return set()
    assert transaction.get_connection().in_atomic_block, "write_prepared needs a transaction"
    # Versions retired or dropped while the rows were encoded are no longer written.
    kept = {v.pk for v in still_written(field, [item.version for item in prepared.pending])}
    prepared.pending = [item for item in prepared.pending if item.version.pk in kept]
    if not prepared.pending:
        return set()
    keys = list(dict.fromkeys(row[0] for item in prepared.pending for row in item.rows))
    expected = stores.lock_rows(field, keys)  # pk -> the row version now (deleted rows: absent)
    changed = {pk for pk, version in expected.items() if prepared.read_versions.get(pk) != version}
    current: dict[Any, bytes] = {}  # pk -> hash of the source now, of the changed rows
    if changed:
        query, decode = sources.source_query(
            field, [], field.source_queryset().filter(pk__in=list(changed)))
        current = {row[0]: field.source_hash(row[1]) for row in map(decode, query)}
    unchanged = set(expected) - changed
    write_xids: set[str] = set()
    stats = prepared.stats
    for item in prepared.pending:
        store = stores.store_for(item.version, field)
        rows = [row for row in item.rows if row[0] in unchanged or current.get(row[0]) == row[1]]
        done = store.write(rows, expected) if rows else {}
        expected.update(done)  # the next version's write of these rows expects our own update
        if store.rewrites_row:  # the row's version is now this transaction's
            write_xids.update(done.values())
        written = [row for row in rows if row[0] in done]
        stats.conflicted += len(item.rows) - len(written)
        stats.skipped += sum(1 for row in written if row[2] is None)
        stats.embedded += sum(1 for row in written if row[2] is not None)
    return write_xids


def sync_queryset(
    field: EmbeddingSource,
    queryset: models.QuerySet | None = None,
    versions: Iterable[EmbeddingVersion] | None = None,
    page_size: int | None = None,
    refine: Callable[[models.QuerySet], models.QuerySet] | None = None,
) -> int:
    """Re-embed every stale row of ``queryset`` for every written version; returns rows written.

    ``refine`` narrows the rows read in the same query (not as a subquery): a store's catch-up
    filter names the user's table, which a subquery would rename."""
    versions = list(versions) if versions is not None else list(
        EmbeddingVersion.objects.for_target(field.target).written()
    )
    if not versions:
        return 0
    base = field.source_queryset()
    if queryset is not None:
        base = base.filter(pk__in=queryset.values("pk"))
    if refine is not None:
        base = refine(base)
    page_size = page_size or get_config().batch_size
    stats = SyncStats()

    def refresh(keys: list[Any]) -> None:
        # Read again: the rows may have changed since the scan saw them.
        for page, _ in sources.iter_source_pages(field, versions, base.filter(pk__in=keys), page_size):
            prepared = prepare(field, versions, page)
            if prepared.pending:
                with transaction.atomic():
                    write_prepared(field, prepared)
            record_failures(prepared.stats)
            stats.add(prepared.stats)

    # One streamed read of the rows finds the unfresh ones; only those are read again, encoded
    # and written, a page at a time.
    keys: list[Any] = []
    for pk, _, _ in sources.scan_unfresh(field, versions, base):
        keys.append(pk)
        if len(keys) >= page_size:
            refresh(keys)
            keys = []
    if keys:
        refresh(keys)
    return stats.embedded + stats.skipped


def count_stale(field: EmbeddingSource, versions: Sequence[EmbeddingVersion]) -> list[int]:
    """Per version: rows embedded from a source text that has changed since (a full read)."""
    return [len(stale) for _, stale in unfresh_rows(field, versions)]


def unfresh_rows(
    field: EmbeddingSource, versions: Sequence[EmbeddingVersion]
) -> list[tuple[set[Any], set[Any]]]:
    """Per version: (keys of rows without a vector or hash, keys of stale rows), in one read of
    the table."""
    result: list[tuple[set[Any], set[Any]]] = [(set(), set()) for _ in versions]
    if not versions:
        return result
    for pk, current, stored in sources.scan_unfresh(field, versions, field.source_queryset()):
        for (missing, stale), value in zip(result, stored, strict=True):
            if value is None:
                missing.add(pk)
            elif value != current:
                stale.add(pk)
    return result
