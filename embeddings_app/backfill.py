"""Backfill: embed every row of a version that is missing or stale, in primary-key ranges.

``start()`` plans the ranges (keyset boundaries, never OFFSET) and records a ``BackfillRun`` with
one ``BackfillBatch`` per range; each batch is one ``run_batch()`` call, as a Celery task
(``tasks.dispatch``, which also re-dispatches batches whose lease expired) or in-process
(``run_inline``). A batch is idempotent (it only embeds rows that are not fresh, and writes
with compare-and-set), so a redelivered or retried batch is harmless; its result is counted into
the run exactly once. The batch that finishes last finalizes the run: a catch-up pass over rows
that changed under a batch, then the version becomes ``ready`` once every row is covered, or
``failed`` (resumable: re-run ``backfill``) if some rows could not be embedded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Sequence
from datetime import timedelta
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from django.db import connection, transaction
from django.db.models import Exists, F, OuterRef, Q, QuerySet
from django.db.models.functions import Now
from django.utils import timezone

from . import encoders, lifecycle, limits, registry, sources, stores, sync
from .config import get_config
from .exceptions import Refused
from .models import BackfillBatch, BackfillRun, EmbeddingVersion, RowFailure, State

if TYPE_CHECKING:
    from .fields import VersionedEmbedding

logger = logging.getLogger(__name__)

Range = tuple[Any, Any]  # [low, high): None means unbounded

BACKFILLABLE_STATES = (State.NEW, State.BACKFILLING, State.FAILED, State.READY, State.ACTIVE,
                       State.STANDBY)


def plan_ranges(version: EmbeddingVersion, batch_size: int) -> list[Range]:
    """Primary-key ranges of about ``batch_size`` rows each, read from the primary-key index."""
    field = registry.get(version.target)
    pk = stores.qn(field.model._meta.pk.column)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT pk FROM (SELECT {pk} AS pk, row_number() OVER (ORDER BY {pk}) AS n "
            f"FROM {stores.qn(field.table)}) numbered WHERE (n - 1) %% %s = 0 ORDER BY pk",
            [batch_size],
        )
        starts = [row[0] for row in cursor.fetchall()]
    if not starts:
        return []
    # The first range is open below: rows inserted later with a smaller key (UUIDs) are covered.
    bounds = [None, *starts[1:], None]
    return list(pairwise(bounds))


def start(version: EmbeddingVersion, *, batch_size: int | None = None, mode: str = "celery",
          actor: str = "") -> tuple[BackfillRun, list[Range]]:
    """Plan a run of ``version``: its ranges, its progress record and one record per batch.

    Any earlier run of the version still marked running (its workers died, or it is being
    replaced) is closed as superseded: its remaining batches do nothing when they arrive."""
    _check_backfillable(version)
    encoders.for_version(version)  # refuse now, not in every worker, if the model files changed
    batch_size = get_config().batch_size if batch_size is None else batch_size
    limits.integer("The batch size", batch_size, 1, limits.MAX_BATCH_SIZE, "batch_size")
    ranges = plan_ranges(version, batch_size)
    field = registry.get(version.target)
    with lifecycle.locked_versions(version.target) as versions:
        version = lifecycle.locked_version(version.target, versions, version)
        _check_backfillable(version)  # again, under the lock
        if version.write_error:  # its model loads again (checked above): written from now on
            EmbeddingVersion.objects.filter(pk=version.pk).update(write_error="",
                                                                  write_error_at=None)
            version.write_error, version.write_error_at = "", None
        if version.state in (State.NEW, State.FAILED, State.READY):
            lifecycle.transition(version, State.BACKFILLING, actor=actor, note=f"backfill ({mode})")
        run = BackfillRun.objects.create(
            version=version, mode=mode, batch_size=batch_size, batches_total=len(ranges),
            rows_total=field.model._base_manager.count(),
        )
        BackfillRun.objects.filter(version=version, status=BackfillRun.Status.RUNNING).exclude(
            pk=run.pk
        ).update(status=BackfillRun.Status.FAILED, finished_at=timezone.now(),
                 last_error=f"superseded by run {run.pk}", updated_at=timezone.now())
        BackfillBatch.objects.bulk_create([
            BackfillBatch(run=run, number=number, low=_json_key(low), high=_json_key(high))
            for number, (low, high) in enumerate(ranges)
        ])
    if not ranges:
        finalize(run.pk)
    return run, ranges


def _check_backfillable(version: EmbeddingVersion) -> None:
    if version.state not in BACKFILLABLE_STATES:
        raise Refused(
            f"{version} is {version.state}: only new, failed, ready, active or standby versions "
            "can be backfilled; add a new version instead."
        )


def _json_key(value: Any) -> Any:
    return str(value) if isinstance(value, uuid.UUID) else value


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _no_flush_wait() -> None:
    """This transaction's commit does not wait for the disk flush of the WAL (it is as visible and
    as atomic; only a crash of the database server within a fraction of a second can lose it).

    For the batch's claim only: it is progress information (running, attempt, worker). If it is
    lost, the batch is still pending or running and its redelivery claims it again; and the
    batch's completion, which commits normally, flushes the WAL up to itself, claim included."""
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL synchronous_commit = off")


def run_batch(run_id: int, number: int) -> sync.SyncStats:
    """Embed the missing or stale rows of batch ``number`` of the run, then count it as done.

    A batch already counted (a duplicate delivery) does nothing."""
    outermost = not connection.in_atomic_block  # never change a caller's transaction
    lease = get_config().batch_lease
    with transaction.atomic():
        if outermost:
            _no_flush_wait()
        now = timezone.now()
        claimed = BackfillBatch.objects.filter(
            run_id=run_id, number=number,
            status__in=(BackfillBatch.Status.PENDING, BackfillBatch.Status.RUNNING),
        ).update(status=BackfillBatch.Status.RUNNING, attempts=F("attempts") + 1,
                 worker=_worker_name(), started_at=now,
                 lease_expires_at=now + timedelta(seconds=lease))
        attempt = BackfillBatch.objects.filter(run_id=run_id, number=number).values_list(
            "attempts", flat=True).first()
    stats = sync.SyncStats()
    if not claimed:
        # A redelivery (or a retry) of a batch already counted: the attempt that counted it may
        # have died before finalizing the run.
        _finalize_if_last(run_id)
        return stats
    # Not inside a caller's transaction: the heartbeat's own session would wait for its locks.
    heartbeat = _Heartbeat(run_id, number, attempt, lease) if outermost else None
    try:
        return _run_claimed_batch(run_id, number, stats)
    finally:
        if heartbeat is not None:
            heartbeat.stop()


def _run_claimed_batch(run_id: int, number: int, stats: sync.SyncStats) -> sync.SyncStats:
    batch = BackfillBatch.objects.select_related("run__version").get(run_id=run_id, number=number)
    run = batch.run
    version = run.version
    counted = None
    write_xids: set[str] = set()
    if version.is_written and run.status == BackfillRun.Status.RUNNING:
        field = registry.get(version.target)
        queryset = field.source_queryset()
        if batch.low is not None:
            queryset = queryset.filter(pk__gte=batch.low)
        if batch.high is not None:
            queryset = queryset.filter(pk__lt=batch.high)
        for page, last in sources.iter_source_pages(field, [version], queryset, run.batch_size):
            prepared = sync.prepare(field, [version], page)  # encodes: outside any transaction
            with transaction.atomic():
                # The last page's rows and the batch's completion commit together: one commit
                # per batch, and a batch is never counted without its rows (nor the reverse).
                write_xids |= sync.write_prepared(field, prepared)
                stats.add(prepared.stats)
                if last:
                    counted = _count_batch(run_id, number, stats, write_xids=write_xids)
    if counted is None:
        with transaction.atomic():
            counted = _count_batch(run_id, number, stats, write_xids=write_xids)
    if counted:
        _finalize_if_last(run_id)
    return stats


class _Heartbeat:
    """Renews the lease of a running batch every third of the lease, from a thread with its own
    database session, until stopped, or until the batch is no longer this attempt's (done, or
    reclaimed after a lost lease). A failed renewal (a dropped connection) is retried at the next
    beat on a new connection."""

    def __init__(self, run_id: int, number: int, attempt: int | None, lease: float) -> None:
        self.batch = BackfillBatch.objects.filter(
            run_id=run_id, number=number, attempts=attempt, status=BackfillBatch.Status.RUNNING)
        self.lease = lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="batch-lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from django.db import connection as own  # this thread's own connection

        try:
            while not self._stop.wait(self.lease / 3):
                try:
                    renewed = self.batch.update(
                        lease_expires_at=timezone.now() + timedelta(seconds=self.lease))
                except Exception as exc:  # Django's or psycopg's connection errors alike
                    logger.warning("could not renew the lease of a batch (%s); retrying", exc)
                    _close_quietly(own)
                    continue
                if not renewed:
                    return
        finally:
            _close_quietly(own)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _close_quietly(conn: Any) -> None:
    """Close a Django connection that may be broken (the next query opens a new one)."""
    try:
        conn.close()
    except Exception:  # a broken connection can fail to close; it is dropped either way
        conn.connection = None


def with_live_lease(runs: QuerySet[BackfillRun]) -> QuerySet[BackfillRun]:
    """``runs`` annotated with ``live_lease``: whether one of its batches holds an unexpired
    lease (for ``stalled_runs`` without a query of its own)."""
    return runs.annotate(live_lease=Exists(BackfillBatch.objects.filter(
        run=OuterRef("pk"), status=BackfillBatch.Status.RUNNING, lease_expires_at__gte=Now())))


def stalled_runs(runs: Sequence[BackfillRun]) -> set[int]:
    """Ids of the running ``runs`` on which nobody is working: no batch holds a live lease, none
    was counted for a lease period, and no finalizer is at work. Their progress shows "stalled",
    never an ETA."""
    running = [run for run in runs if run.status == BackfillRun.Status.RUNNING]
    if not running:
        return set()
    now = timezone.now()
    since = now - timedelta(seconds=get_config().batch_lease)
    if all(hasattr(run, "live_lease") for run in running):  # annotated by with_live_lease()
        live = {run.pk for run in running if run.live_lease}
    else:
        live = set(BackfillBatch.objects.filter(
            run_id__in=[run.pk for run in running], status=BackfillBatch.Status.RUNNING,
            lease_expires_at__gte=now).values_list("run_id", flat=True))
    return {run.pk for run in running if run.pk not in live and run.updated_at < since
            and not (run.finished_at and run.finished_at >= since)}


def _complete_batch(run_id: int, number: int, stats: sync.SyncStats, error: str = "") -> None:
    """Count a finished batch into its run, once; the last one finalizes the run."""
    with transaction.atomic():
        counted = _count_batch(run_id, number, stats, error)
    if counted:
        _finalize_if_last(run_id)


def _count_batch(run_id: int, number: int, stats: sync.SyncStats, error: str = "",
                 write_xids: set[str] | None = None) -> bool:
    """In the caller's transaction: mark the batch done (or failed) and add its counts to the
    run, only if it was not counted before. Returns whether it was counted now."""
    status = BackfillBatch.Status.FAILED if error else BackfillBatch.Status.DONE
    now = timezone.now()
    counted = BackfillBatch.objects.filter(
        run_id=run_id, number=number,
        status__in=(BackfillBatch.Status.PENDING, BackfillBatch.Status.RUNNING),
    ).update(status=status, rows_processed=stats.processed, rows_embedded=stats.embedded,
             rows_skipped=stats.skipped, rows_conflicted=stats.conflicted,
             rows_failed=stats.failed, write_xids=sorted(write_xids or ()), error=error[:2000],
             finished_at=now)
    if not counted:
        return False
    updates: dict[str, Any] = {
        "rows_processed": F("rows_processed") + stats.processed,
        "rows_embedded": F("rows_embedded") + stats.embedded,
        "rows_skipped": F("rows_skipped") + stats.skipped,
        "rows_conflicted": F("rows_conflicted") + stats.conflicted,
        "rows_failed": F("rows_failed") + stats.failed,
        "batches_done": F("batches_done") + 1,
        "updated_at": now,
    }
    if error:
        updates["last_error"] = error[:2000]
    elif stats.errors:
        updates["last_error"] = f"row {stats.errors[-1][1]}: {stats.errors[-1][2]}"[:2000]
    BackfillRun.objects.filter(pk=run_id).update(**updates)
    sync.record_failures(stats, run_id)
    return True


def _finalize_if_last(run_id: int) -> None:
    run = BackfillRun.objects.only("batches_done", "batches_total").get(pk=run_id)
    if run.batches_done >= run.batches_total:
        finalize(run_id)


def batch_failed(run_id: int, number: int, error: str) -> None:
    """A batch gave up (retries exhausted, or a permanent error): record it; the run ends as
    failed, resumable."""
    batch = BackfillBatch.objects.filter(run_id=run_id, number=number).first()
    if (batch is not None and batch.status == BackfillBatch.Status.RUNNING
            and batch.worker != _worker_name() and batch.lease_expires_at is not None
            and batch.lease_expires_at > timezone.now()):
        # This delivery lost its lease (the batch was reclaimed) and another worker holds the
        # batch now: that worker's outcome counts, not this stale delivery's.
        logger.warning("batch %s of run %s: a stale delivery gave up (%s); %s holds it now",
                       number, run_id, error, batch.worker)
        return
    where = f"range [{batch.low}, {batch.high})" if batch else f"batch {number}"
    _complete_batch(run_id, number, sync.SyncStats(), error=f"{where}: {error}")


def finalize(run_id: int) -> None:
    """Finish the run: catch-up, then ``done`` + ``ready`` (or ``failed``).

    Only one finalizer per run: claimed by setting finished_at (a claim older than the lease is
    taken over: its finalizer died); the status stays "running" until the version's state is
    final, so a reader never sees "done" before "ready"."""
    now = timezone.now()
    stale_claim = now - timedelta(seconds=get_config().batch_lease)
    claimed = BackfillRun.objects.filter(
        Q(finished_at__isnull=True) | Q(finished_at__lt=stale_claim),  # or its finalizer died
        pk=run_id, status=BackfillRun.Status.RUNNING,
    ).update(finished_at=now)
    if not claimed:
        return
    try:
        _finalize_claimed(run_id)
    except Exception:
        # Let a retry (or the next reclaim) finalize at once; on a dead connection the claim
        # expires after the lease instead.
        _close_quietly(connection)
        with contextlib.suppress(Exception):
            BackfillRun.objects.filter(pk=run_id, status=BackfillRun.Status.RUNNING,
                                       finished_at=now).update(finished_at=None)
        raise


def _finalize_claimed(run_id: int) -> None:
    run = BackfillRun.objects.get(pk=run_id)
    version = EmbeddingVersion.objects.get(pk=run.version_id)
    field = registry.get(version.target)
    batch_errors = run.batches.filter(status=BackfillBatch.Status.FAILED).count()
    if version.is_written and not batch_errors:
        _catch_up(run, version, field)
    done, total = version.store.coverage()
    complete = done == total and not batch_errors
    error = ""
    if batch_errors:
        error = f"{batch_errors} batches failed; last: {run.last_error}"
    elif not complete:
        failed_rows = RowFailure.objects.filter(run_id=run_id).count()
        error = (f"{total - done} rows have no vector ({failed_rows} could not be embedded, "
                 "see failures); fix them and re-run backfill to resume")
    # The run's status and the version's state change together, under the lifecycle lock.
    with lifecycle.locked_versions(version.target) as versions:
        version = lifecycle.locked_version(version.target, versions, version)
        ended = BackfillRun.objects.filter(pk=run_id, status=BackfillRun.Status.RUNNING).update(
            status=BackfillRun.Status.DONE if complete else BackfillRun.Status.FAILED,
            finished_at=timezone.now(), updated_at=timezone.now(),
            last_error=error or run.last_error,
        )
        if ended and version.state == State.BACKFILLING:  # not if superseded meanwhile
            lifecycle.transition(version, State.READY if complete else State.FAILED,
                                 note=f"backfill run {run_id}: {done}/{total} rows")


def _catch_up(run: BackfillRun, version: EmbeddingVersion, field: VersionedEmbedding) -> None:
    """Re-embed the rows that changed under a batch and were written by a path without
    dual-write (bulk_update, QuerySet.update(), raw SQL).

    Only rows that may have changed since they were written are read (the store's catch-up
    filter: for a column store, rows whose version (xmin) is not the transaction of a batch that
    wrote them; for a table store, rows whose version is not the one their vector was written
    against). Rows that failed in this run are not retried."""
    write_xids = sorted({xid for xids in run.batches.values_list("write_xids", flat=True)
                         for xid in xids or ()})
    failed_keys = list(RowFailure.objects.filter(run_id=run.pk).values_list("row_key", flat=True))
    store = version.store

    def changed_since(rows: QuerySet) -> QuerySet:
        rows = store.catch_up(rows, write_xids)
        return rows.exclude(pk__in=failed_keys) if failed_keys else rows

    sync.sync_queryset(field, versions=[version], page_size=run.batch_size, refine=changed_since)


def run_inline(run: BackfillRun, ranges: list[Range], progress: Any = None) -> None:
    """Run every batch of ``run`` in this process, in order."""
    for number in range(len(ranges)):
        stats = run_batch(run.pk, number)
        if progress is not None:
            progress(stats.processed)
