"""Celery tasks. They are ``shared_task``s: they run on the project's own Celery app and broker,
routed to ``EMBEDDINGS["QUEUE"]`` by whoever dispatches them."""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task
from django.db import DatabaseError, InterfaceError, OperationalError

from . import backfill, registry, sync
from .models import EmbeddingVersion

# Transient: a dropped connection, a deadlock or serialization failure, a restarting server.
RETRYABLE = (OperationalError, InterfaceError)


class BackfillBatchTask(Task):
    def on_failure(self, exc: BaseException, task_id: str, args: tuple, kwargs: dict,
                   einfo: Any) -> None:
        run_id, low, high = args
        backfill.batch_failed(run_id, low, high, f"{type(exc).__name__}: {exc}")


@shared_task(
    base=BackfillBatchTask,
    name="embeddings_app.backfill_batch",
    acks_late=True,  # a batch is idempotent: redeliver it if the worker dies mid-way
    reject_on_worker_lost=True,
    autoretry_for=RETRYABLE,
    retry_backoff=2,
    retry_backoff_max=60,
    retry_jitter=True,
    max_retries=8,
    ignore_result=True,
)
def backfill_batch(run_id: int, low: Any, high: Any) -> dict[str, int]:
    stats = backfill.run_batch(run_id, low, high)
    return {"processed": stats.processed, "embedded": stats.embedded}


@shared_task(
    name="embeddings_app.refresh_rows",
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(*RETRYABLE, DatabaseError),
    retry_backoff=True,
    retry_jitter=True,
    max_retries=8,
    ignore_result=True,
)
def refresh_rows_task(target: str, pks: list[Any]) -> int:
    """Dual-write in ``"celery"`` mode: re-embed these rows for every written version."""
    field = registry.get(target)
    versions = list(EmbeddingVersion.objects.for_target(target).written())
    instances = list(field.source_queryset().filter(pk__in=pks))
    stats = sync.refresh_rows(field, versions, instances)
    return stats.embedded
