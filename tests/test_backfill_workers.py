"""Backfill on real Celery worker processes and real PostgreSQL, under concurrent writes, worker
crashes and dropped database connections, on every broker of the matrix."""

from __future__ import annotations

import os
import re
import signal

import pytest
from django.core.management import call_command

from embeddings_app import backfill, tasks
from embeddings_app.models import BackfillBatch, BackfillRun, EmbeddingVersion, State
from project.news.models import Article
from tests.backfill_helpers import (
    WORKER_ENV,
    Writers,
    assert_every_row_fresh,
    blocked_backends,
    broker,  # noqa: F401  (fixture)
    broker_names,
    create_articles,
    raw_connection,
    wait_until,
)
from tests.conftest import TARGET
from tests.workers import wait_for_run

# Rows of the concurrency test: 5,000 on the default broker; the same test runs on the other
# brokers of the matrix with fewer rows to keep the suite's time reasonable on 2 cores.
CONCURRENCY_ROWS = int(os.environ.get("EMBEDDINGS_TEST_CONCURRENCY_ROWS", "5000"))
CONCURRENCY_ROWS_OTHER_BROKERS = int(os.environ.get("EMBEDDINGS_TEST_CONCURRENCY_ROWS_OTHER",
                                                    "1000"))


# The broker matrix in the column layout, and one broker (the default) in the table layout: the
# layout changes the write statement, not what the broker does.
BROKERS_AND_LAYOUTS = pytest.mark.parametrize(
    ("broker", "layout"),
    [(name, "column") for name in broker_names()] + [("default", "table")], indirect=True)


def _check_run_consistent(run: BackfillRun, rows: int) -> None:
    batches = list(run.batches.all())
    assert len(batches) == run.batches_total == run.batches_done
    assert all(batch.status == BackfillBatch.Status.DONE for batch in batches)
    # The run's totals are the sums of its counted batches, each counted once.
    assert run.rows_processed == sum(batch.rows_processed for batch in batches) == rows
    assert run.rows_embedded == sum(batch.rows_embedded for batch in batches)
    assert run.rows_conflicted == sum(batch.rows_conflicted for batch in batches)


@pytest.mark.worker
@BROKERS_AND_LAYOUTS
def test_backfill_under_concurrent_writes_every_row_fresh(broker, layout, celery_worker):  # noqa: F811
    """Acceptance 1 and 4: 4 writer threads keep changing random rows while two worker
    processes backfill; afterwards every row's vector is its current text's, none missing."""
    rows = CONCURRENCY_ROWS if broker == "default" else CONCURRENCY_ROWS_OTHER_BROKERS
    articles = create_articles(rows)
    call_command("embeddings", "add", TARGET, "v2", "--model", "tiny")
    worker = celery_worker(concurrency=2, extra_env=WORKER_ENV)
    writers = Writers(Article, [a.pk for a in articles], count=4).start()
    try:
        call_command("embeddings", "backfill", TARGET, "v2", "--batch-size", "250")
    finally:
        edits = writers.stop()

    version = EmbeddingVersion.objects.get(target=TARGET, version="v2")
    run = BackfillRun.objects.get(version=version)
    assert edits > 0
    assert version.layout == layout
    assert version.state == State.READY
    assert run.status == BackfillRun.Status.DONE
    _check_run_consistent(run, rows)
    assert version.store.coverage() == (rows, rows)
    assert assert_every_row_fresh(TARGET, "v2") == rows
    assert "embeddings_app.backfill_batch" in worker.log()


def _lock_row_in_batch(run: BackfillRun, number: int):
    """Hold a row lock inside batch ``number``'s range from another connection, so the batch
    stops in the middle: encoded, waiting to write."""
    batch = run.batches.get(number=number)
    queryset = Article.objects.order_by("pk")
    if batch.low is not None:
        queryset = queryset.filter(pk__gte=batch.low)
    pk = queryset.values_list("pk", flat=True)[5]
    locker = raw_connection()
    locker.execute(f"SELECT 1 FROM {Article._meta.db_table} WHERE id = %s FOR UPDATE", [pk])
    return locker


@pytest.mark.worker
@BROKERS_AND_LAYOUTS
def test_worker_killed_mid_batch_backfill_completes_after_restart(broker, layout,  # noqa: F811
                                                                 celery_worker):
    """Acceptance 2: SIGKILL of the worker process running a batch; a new worker finishes."""
    rows = 300
    create_articles(rows)
    call_command("embeddings", "add", TARGET, "v2", "--model", "tiny")
    version = EmbeddingVersion.objects.get(target=TARGET, version="v2")
    assert version.layout == layout
    run, ranges = backfill.start(version, batch_size=50)
    locker = _lock_row_in_batch(run, 3)
    worker = celery_worker(concurrency=2, extra_env=WORKER_ENV)
    try:
        tasks.dispatch(run, ranges)
        wait_until(lambda: blocked_backends(locker), what="batch 3 to block on the row lock")
        batch = run.batches.get(number=3)
        assert batch.status == BackfillBatch.Status.RUNNING
        pid = int(batch.worker.rsplit(":", 1)[1])
        assert pid in worker.child_pids()
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: "WorkerLostError" in worker.log() or "SIGKILL" in worker.log(),
                   what="the worker to notice the killed process")
    finally:
        locker.rollback()
        locker.close()
    worker.stop()
    celery_worker(concurrency=2, extra_env=WORKER_ENV)
    run = wait_for_run(run.pk)

    assert run.status == BackfillRun.Status.DONE, run.last_error
    assert run.batches.get(number=3).attempts >= 2
    # No row embedded twice by completed batches: their embedded counts add up to the rows.
    _check_run_consistent(run, rows)
    assert run.rows_embedded == rows
    version.refresh_from_db()
    assert version.state == State.READY
    assert version.store.coverage() == (rows, rows)
    assert assert_every_row_fresh(TARGET, "v2") == rows


@pytest.mark.worker
def test_database_connection_cut_under_a_batch_is_retried(celery_worker):
    """Acceptance 3: pg_terminate_backend on the connection of a running batch; it retries."""
    rows = 300
    create_articles(rows)
    call_command("embeddings", "add", TARGET, "v2", "--model", "tiny")
    version = EmbeddingVersion.objects.get(target=TARGET, version="v2")
    run, ranges = backfill.start(version, batch_size=50)
    locker = _lock_row_in_batch(run, 2)
    worker = celery_worker(concurrency=2, extra_env=WORKER_ENV)
    try:
        tasks.dispatch(run, ranges)
        backends = wait_until(lambda: blocked_backends(locker),
                              what="batch 2 to block on the row lock")
        with raw_connection() as admin:
            admin.autocommit = True
            for pid in backends:
                assert admin.execute("SELECT pg_terminate_backend(%s)", [pid]).fetchone()[0]
    finally:
        locker.rollback()
        locker.close()
    run = wait_for_run(run.pk)

    assert run.status == BackfillRun.Status.DONE, run.last_error
    assert run.batches.get(number=2).attempts >= 2
    assert re.search(r"backfill_batch\[[^\]]+\] retry", worker.log()), worker.log()[-3000:]
    _check_run_consistent(run, rows)
    assert run.rows_embedded == rows
    assert assert_every_row_fresh(TARGET, "v2") == rows
