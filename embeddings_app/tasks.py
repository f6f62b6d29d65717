"""Celery tasks, and the only code that sends them. They are ``shared_task``s: they run on the
project's own Celery app and broker, routed to ``EMBEDDINGS["QUEUE"]``: ``dispatch`` sends a
backfill run's batches (``backfill.start`` plans them), ``reclaim_expired`` sends again those
whose lease expired, and ``signals`` sends ``refresh_rows_task`` in the ``"celery"`` dual-write
mode.

Reliability settings (docs/backfill.md): a batch is idempotent, so it is acknowledged late and
re-queued if its worker process dies (``acks_late`` + ``reject_on_worker_lost``), and if the whole
worker dies its lease expires and the batch is reclaimed (``reclaim_expired``); transient
database errors (Django's and psycopg's) are retried with exponential backoff and jitter, on a new
connection; a batch has a hard time limit
well below the broker's visibility timeout (Redis: 1 hour by default), so the broker never hands
a batch that is still running to a second worker. Workers should run with
``worker_prefetch_multiplier = 1`` (project/settings.py does) so a long batch does not hold others.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import psycopg
from celery import Task, group, shared_task
from django.db import DatabaseError, InterfaceError, OperationalError, connection, transaction
from django.db.models import F, Q
from django.utils import timezone

from . import backfill, capture, lifecycle, probes, registry, shadow, sync
from .config import get_config
from .exceptions import ProviderUnavailable
from .models import STORED_STATES, BackfillBatch, BackfillRun, EmbeddingVersion, VersionEvent

logger = logging.getLogger(__name__)

# Connection errors, Django's and psycopg's alike: psycopg's own escape Django's wrapper where
# the app talks to the driver directly (pgvector's type registration, COPY), e.g. the
# AdminShutdown of a terminated backend or a restarting server.
CONNECTION_ERRORS = (OperationalError, InterfaceError, psycopg.OperationalError,
                     psycopg.InterfaceError)
# Transient: a dropped connection, a deadlock or serialization failure, a restarting server; an
# embedding API still unavailable after its own retries (429, 5xx, timeouts: embeddings_app.api);
# a device out of memory even one text per forward pass, or lost (DeviceUnavailable, a
# ProviderUnavailable: embeddings_app.encoders). A retried batch is never written at another
# precision or on another device than its worker's (docs/devices.md).
RETRYABLE = (*CONNECTION_ERRORS, ProviderUnavailable)

Func = TypeVar("Func", bound=Callable[..., Any])


def reconnecting(func: Func) -> Func:
    """After a connection error, close this process's Django connection before the error reaches
    Celery's retry: Django closes a broken connection only when the error went through its own
    wrapper, so the retry would otherwise run on the dead one."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CONNECTION_ERRORS:
            backfill._close_quietly(connection)
            raise

    return wrapper  # type: ignore[return-value]

# Seconds. A batch of BATCH_SIZE rows takes seconds to a few minutes on CPU; the hard limit must
# stay below the broker's visibility timeout (Redis/SQS default 3600 s).
BATCH_SOFT_TIME_LIMIT = 900
BATCH_TIME_LIMIT = 1200
# A drain task stops taking batches after this long (well inside the soft limit) and sends
# itself again if entries are left: a long queue never holds one task past its time limit.
DRAIN_SECONDS = 300

RETRY_OPTIONS: dict[str, Any] = {
    "autoretry_for": RETRYABLE,
    "retry_backoff": 2,  # 2, 4, 8, ... seconds
    "retry_backoff_max": 120,
    "retry_jitter": True,  # a random delay in [0, backoff]: retries do not stampede
    "max_retries": 8,
}


# A task that re-embeds rows: idempotent, so acknowledged late and redelivered if its worker
# process dies; bounded well below the broker's visibility timeout; retried when transient.
ROW_TASK_OPTIONS: dict[str, Any] = {
    "acks_late": True,
    "reject_on_worker_lost": True,
    "soft_time_limit": BATCH_SOFT_TIME_LIMIT,
    "time_limit": BATCH_TIME_LIMIT,
    "ignore_result": True,
    **RETRY_OPTIONS,
}


class BackfillBatchTask(Task):
    def on_failure(self, exc: BaseException, task_id: str, args: tuple, kwargs: dict,
                   einfo: Any) -> None:
        run_id, number = args
        if isinstance(exc, CONNECTION_ERRORS):
            backfill._close_quietly(connection)
        backfill.batch_failed(run_id, number, f"{type(exc).__name__}: {exc}")


@shared_task(
    base=BackfillBatchTask,
    name="embeddings_app.backfill_batch",
    **ROW_TASK_OPTIONS,
)
@reconnecting
def backfill_batch(run_id: int, number: int) -> dict[str, int]:
    stats = backfill.run_batch(run_id, number)
    return {"processed": stats.processed, "embedded": stats.embedded}


@shared_task(
    name="embeddings_app.refresh_rows",
    **{**ROW_TASK_OPTIONS, "autoretry_for": (*RETRYABLE, DatabaseError)},
)
@reconnecting
def refresh_rows_task(target: str, pks: list[Any]) -> int:
    """Dual-write in ``"celery"`` mode: re-embed these rows for every written version."""
    field = registry.get(target)
    versions = list(EmbeddingVersion.objects.for_target(target).written())
    instances = list(field.source_queryset().filter(pk__in=pks))
    stats = sync.refresh_rows(field, versions, instances)
    sync.record_failures(stats)
    return stats.embedded


@shared_task(
    name="embeddings_app.sweep",
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    **RETRY_OPTIONS,
)
@reconnecting
def sweep(target: str | None = None, full_scan: bool | None = None) -> dict[str, int]:
    """Re-embed rows whose source changed without a save signal (``bulk_update``,
    ``QuerySet.update()``, raw SQL), for every version still written, of one target or all:
    drains each target's change queue; reads every row only of a target whose writes are not
    captured, or with ``full_scan`` (default ``EMBEDDINGS["SWEEP_FULL_SCAN"]``). Returns the
    rows written per target.

    Schedule it with Celery beat, e.g.::

        CELERY_BEAT_SCHEDULE = {"embeddings-sweep": {
            "task": "embeddings_app.sweep", "schedule": 3600, "options": {"queue": "embeddings"}}}
    """
    reclaim_expired()  # batches of dead workers, if no `backfill` command follows them
    targets = [target] if target else registry.all_targets()
    return {name: capture.sweep_target(registry.get(name), full_scan=full_scan)
            for name in targets}


@shared_task(
    name="embeddings_app.drain",
    **ROW_TASK_OPTIONS,
)
@reconnecting
def drain(target: str | None = None) -> dict[str, dict[str, int]]:
    """Drain the change queue of one target or of all (``capture.drain``): the rows written
    behind the app's back since, refreshed in batches. Several drains may run at once, on any
    workers: they never take the same entries. Stops after ``DRAIN_SECONDS`` and sends itself
    again if entries are left. Schedule it often (the lag bound, docs/backfill.md), e.g.::

        CELERY_BEAT_SCHEDULE = {"embeddings-drain": {
            "task": "embeddings_app.drain", "schedule": 10, "options": {"queue": "embeddings"}}}
    """
    targets = [target] if target else registry.all_targets()
    result = {}
    for name in targets:
        field = registry.get(name)
        stats = capture.drain(field, max_seconds=DRAIN_SECONDS)
        result[name] = stats.as_dict()
        if not stats.emptied:  # out of time with entries left: carry on in a new task
            drain.apply_async((name,), queue=get_config().queue)
    return result


@shared_task(name="embeddings_app.reclaim", ignore_result=True, **RETRY_OPTIONS)
@reconnecting
def reclaim() -> int:
    """Re-dispatch the backfill batches whose lease expired (their worker died) and finalize runs
    whose finalizer died (``reclaim_expired``). The ``backfill`` command does this while
    it waits; after ``--no-wait`` or an admin backfill, schedule this with Celery beat, e.g.
    every ``EMBEDDINGS["BATCH_LEASE"]`` seconds::

        CELERY_BEAT_SCHEDULE = {"embeddings-reclaim": {
            "task": "embeddings_app.reclaim", "schedule": 60, "options": {"queue": "embeddings"}}}
    """
    return len(reclaim_expired())


@shared_task(name="embeddings_app.probe", ignore_result=True)
def probe(target: str | None = None) -> dict[str, bool]:
    """Re-embed the probes of every stored version (of one target or all) and record the result
    (``status``, the admin, ``activate``): catches a model changed under its name. Schedule it
    with Celery beat, e.g.::

        CELERY_BEAT_SCHEDULE = {"embeddings-probe": {
            "task": "embeddings_app.probe", "schedule": 3600, "options": {"queue": "embeddings"}}}
    """
    versions = EmbeddingVersion.objects.filter(state__in=STORED_STATES)
    if target:
        versions = versions.filter(target=registry.get(target).target)
    return {str(version): probes.run(version).passed for version in versions}


@shared_task(name="embeddings_app.shadow_read", ignore_result=True, acks_late=False,
             time_limit=60)
@reconnecting
def shadow_read(candidate_id: int, text: str, k: int, served_keys: list[str],
                served_seconds: float) -> None:
    """One shadow read (``embeddings_app.shadow``): the candidate answers a live search that the
    active version served; the comparison is added to its hourly bucket. Not retried and acked
    early: a lost shadow read is one sample fewer, never a wrong figure. Publishers now send
    ``shadow_reads`` batches; this task still consumes the single reads an earlier release
    published (a rolling deploy)."""
    shadow.record(candidate_id, text, k, served_keys, served_seconds)


@shared_task(name="embeddings_app.shadow_reads", ignore_result=True, acks_late=False,
             time_limit=600)
@reconnecting
def shadow_reads(samples: list[list[Any]]) -> int:
    """A batch of shadow reads, as one process's publisher sends them (``shadow._Publisher``):
    each recorded as ``shadow_read`` records one; a sample that fails is logged and the others
    are still recorded, except after a lost connection, which ends the batch (not retried: a
    retry would record its first samples twice). Returns how many were recorded."""
    done = 0
    for candidate_id, text, k, served_keys, served_seconds in samples:
        try:
            shadow.record(candidate_id, text, k, served_keys, served_seconds)
            done += 1
        except CONNECTION_ERRORS:
            raise
        except Exception:  # one sample fewer, never the batch's others
            logger.warning("shadow read of version %s not recorded", candidate_id, exc_info=True)
    return done


def send_shadow_reads(samples: list[tuple]) -> None:
    # No publish retries: a broker that is down costs one failed attempt per batch.
    shadow_reads.apply_async(([list(sample) for sample in samples],),
                             queue=get_config().queue, retry=False)


@shared_task(name="embeddings_app.build_index", ignore_result=True, acks_late=False)
@reconnecting
def build_index(version_id: int, actor: str = "") -> str:
    """The admin's "Build index": ``lifecycle.build_index`` on a worker (the same build as
    ``embeddings index``, with ``EMBEDDINGS["INDEX_*"]``). Its progress is the server's
    (``pg_stat_progress_create_index``, which the admin polls); its plan and outcome are recorded
    in the version's history.

    Acknowledged on receipt, not late, and never retried: a build may outlast the broker's
    visibility timeout, and a second delivery must not start a second build (the build's
    advisory lock would refuse it anyway). If the worker dies, the build is lost (an INVALID
    index remains, which the next build replaces): start it again."""
    version = EmbeddingVersion.objects.get(pk=version_id)
    notes: list[str] = []

    def on_plan(plan: Any) -> None:
        if plan.session:
            notes.extend(f"PostgreSQL: {notice}" for notice in plan.notices)
        else:
            notes.extend([*plan.lines(), *(f"Warning: {w}" for w in plan.warnings)])

    started = time.monotonic()
    try:
        name = lifecycle.build_index(version.target, version.version, on_plan=on_plan)
    except Exception as exc:
        VersionEvent.objects.create(
            version=version, from_state=version.state, to_state=version.state, actor=actor,
            note=" ".join([f"index build failed: {type(exc).__name__}: {exc}", *notes])[:2000])
        raise
    VersionEvent.objects.create(
        version=version, from_state=version.state, to_state=version.state, actor=actor,
        note=" ".join([f"index {name} built and valid ({time.monotonic() - started:.1f}s).",
                       *notes])[:2000])
    return name


# --- dispatch ---------------------------------------------------------------------------------
def dispatch(run: BackfillRun, ranges: list[backfill.Range]) -> None:
    """Send every batch of ``run`` to the workers of ``EMBEDDINGS["QUEUE"]``, as one group."""
    group(backfill_batch.si(run.pk, number) for number in range(len(ranges))).apply_async(
        queue=get_config().queue)


def reclaim_expired(run_id: int | None = None) -> list[BackfillBatch]:
    """Reclaim the batches whose lease expired (their worker died, or lost its database for
    longer than the lease): each is set pending again, with its ``reclaims`` count, time and note
    (whose lease expired when) recorded on the batch, and re-dispatched to the queue. A run whose
    batches are all counted but whose finalizer died is finalized here. Called by the
    ``backfill`` command while it waits, by the sweep and by the ``embeddings_app.reclaim``
    task. Returns the batches reclaimed (as they were before)."""
    now = timezone.now()
    lease = timedelta(seconds=get_config().batch_lease)
    expired_batches = BackfillBatch.objects.filter(
        status=BackfillBatch.Status.RUNNING, lease_expires_at__lt=now,
        run__status=BackfillRun.Status.RUNNING, run__mode="celery")
    orphans = BackfillRun.objects.filter(
        status=BackfillRun.Status.RUNNING, batches_done__gte=F("batches_total")).filter(
        Q(finished_at__isnull=True, updated_at__lt=now - lease) | Q(finished_at__lt=now - lease))
    if run_id is not None:
        expired_batches = expired_batches.filter(run_id=run_id)
        orphans = orphans.filter(pk=run_id)
    with transaction.atomic():
        expired = list(expired_batches.select_for_update(skip_locked=True, of=("self",)))
        for batch in expired:
            note = (f"{now:%Y-%m-%d %H:%M:%S} UTC: the lease of {batch.worker or '?'} (attempt "
                    f"{batch.attempts}) expired at {batch.lease_expires_at:%H:%M:%S}; reclaimed "
                    "and re-dispatched")
            BackfillBatch.objects.filter(pk=batch.pk).update(
                status=BackfillBatch.Status.PENDING, lease_expires_at=None,
                reclaims=F("reclaims") + 1, reclaimed_at=now,
                reclaim_note=f"{batch.reclaim_note}\n{note}".strip()[-2000:])
            # Sent before the commit: if the broker refuses, nothing changed and the next
            # reclaim tries again; a delivery that arrives first claims the running batch.
            backfill_batch.apply_async((batch.run_id, batch.number), queue=get_config().queue)
    for run in orphans:
        backfill.finalize(run.pk)
    return expired
