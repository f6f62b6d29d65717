"""Backfill: embed every row of a version that is missing or stale, in primary-key ranges.

``start()`` plans the ranges (keyset boundaries, never OFFSET) and records a ``BackfillRun``;
each range is one ``run_batch()`` call, as a Celery task or in-process (``--inline``). The batch
that finishes last finalizes the run: a catch-up pass over rows that changed under a batch, then
the version becomes ``ready`` once every row is covered.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from . import encoders, lifecycle, registry, storage, sync
from .config import get_config
from .exceptions import Refused
from .models import BackfillRun, EmbeddingVersion, State

Range = tuple[Any, Any]  # [low, high): None means unbounded

BACKFILLABLE_STATES = (State.NEW, State.BACKFILLING, State.FAILED, State.READY, State.ACTIVE,
                       State.STANDBY)


def plan_ranges(version: EmbeddingVersion, batch_size: int) -> list[Range]:
    """Primary-key ranges of about ``batch_size`` rows each, read from the primary-key index."""
    field = registry.get(version.target)
    pk = storage.qn(field.model._meta.pk.column)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT pk FROM (SELECT {pk} AS pk, row_number() OVER (ORDER BY {pk}) AS n "
            f"FROM {storage.qn(field.table)}) numbered WHERE n %% %s = 1 ORDER BY pk",
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
    if version.state not in BACKFILLABLE_STATES:
        raise Refused(
            f"{version} is {version.state}: only new, failed, ready, active or standby versions "
            "can be backfilled; add a new version instead."
        )
    encoders.for_version(version)  # refuse now, not in every worker, if the model files changed
    batch_size = batch_size or get_config().batch_size
    if batch_size < 1:
        raise Refused("--batch-size must be a positive integer.")
    ranges = plan_ranges(version, batch_size)
    field = registry.get(version.target)
    with transaction.atomic():
        if version.state in (State.NEW, State.FAILED, State.READY):
            lifecycle.transition(version, State.BACKFILLING, actor=actor, note=f"backfill ({mode})")
        run = BackfillRun.objects.create(
            version=version, mode=mode, batch_size=batch_size, batches_total=len(ranges),
            rows_total=field.model._base_manager.count(),
        )
    if not ranges:
        finalize(run.pk)
    return run, ranges


def run_batch(run_id: int, low: Any, high: Any) -> sync.SyncStats:
    """Embed the missing or stale rows of one range, then count the batch as done."""
    run = BackfillRun.objects.select_related("version").get(pk=run_id)
    version = run.version
    stats = sync.SyncStats()
    if version.is_written and run.status == BackfillRun.Status.RUNNING:
        field = registry.get(version.target)
        queryset = field.source_queryset()
        if low is not None:
            queryset = queryset.filter(pk__gte=low)
        if high is not None:
            queryset = queryset.filter(pk__lt=high)
        for page in sync.iter_pages(queryset, run.batch_size):
            stats.add(sync.refresh_rows(field, [version], page))
    _record_batch(run_id, stats)
    return stats


def _record_batch(run_id: int, stats: sync.SyncStats, error: str = "") -> None:
    updates: dict[str, Any] = {
        "rows_processed": F("rows_processed") + stats.processed,
        "rows_embedded": F("rows_embedded") + stats.embedded,
        "rows_skipped": F("rows_skipped") + stats.skipped,
        "rows_conflicted": F("rows_conflicted") + stats.conflicted,
        "rows_failed": F("rows_failed") + stats.failed,
        "batches_done": F("batches_done") + 1,
        "updated_at": timezone.now(),
    }
    if error:
        updates["last_error"] = error[:2000]
    BackfillRun.objects.filter(pk=run_id).update(**updates)
    run = BackfillRun.objects.only("batches_done", "batches_total").get(pk=run_id)
    if run.batches_done == run.batches_total:
        finalize(run_id)


def batch_failed(run_id: int, low: Any, high: Any, error: str) -> None:
    """A batch gave up (retries exhausted): record it; the run ends as failed, resumable."""
    _record_batch(run_id, sync.SyncStats(), error=f"range [{low}, {high}): {error}")


def finalize(run_id: int) -> None:
    # Only one finalizer per run: the row lock serializes, the status check makes it idempotent.
    with transaction.atomic():
        run = BackfillRun.objects.select_for_update().select_related("version").get(pk=run_id)
        if run.status != BackfillRun.Status.RUNNING:
            return
        run.status = BackfillRun.Status.DONE  # claimed; corrected below if incomplete
        run.save(update_fields=["status"])
    version = EmbeddingVersion.objects.get(pk=run.version_id)
    field = registry.get(version.target)
    error = ""
    if version.is_written and not run.last_error:
        # Rows that changed under a batch before their save could dual-write this version.
        sync.sync_queryset(field, versions=[version], page_size=run.batch_size)
    done, total = storage.coverage(field, version)
    complete = done == total and not run.last_error
    if not complete:
        error = run.last_error or f"{total - done} rows still have no vector"
    with transaction.atomic():
        BackfillRun.objects.filter(pk=run_id).update(
            status=BackfillRun.Status.DONE if complete else BackfillRun.Status.FAILED,
            finished_at=timezone.now(), last_error=error,
        )
        version.refresh_from_db()
        if version.state == State.BACKFILLING:
            lifecycle.transition(version, State.READY if complete else State.FAILED,
                                 note=f"backfill run {run_id}: {done}/{total} rows")


def dispatch(run: BackfillRun, ranges: list[Range]) -> None:
    """Send every batch of ``run`` to the workers of ``EMBEDDINGS["QUEUE"]``."""
    from celery import group

    from .tasks import backfill_batch

    queue = get_config().queue
    group(backfill_batch.si(run.pk, low, high) for low, high in ranges).apply_async(queue=queue)


def run_inline(run: BackfillRun, ranges: list[Range], progress: Any = None) -> None:
    """Run every batch of ``run`` in this process, in order."""
    for low, high in ranges:
        stats = run_batch(run.pk, low, high)
        if progress is not None:
            progress(stats.processed)
