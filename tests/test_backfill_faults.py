"""Faults survived, not just reported (issue 12, build 3): a worker killed with SIGKILL, storms of
terminated database connections and a restart of PostgreSQL itself during a backfill on real
Celery workers. Each backfill completes without a manual re-run, every row checked against a
fresh encode; a killed worker's batch is reclaimed once its lease expires (not after the broker's
visibility timeout) and the reclaim is visible in the run's batches."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from django.core.management import call_command
from django.db import connection, connections
from django.utils import timezone

from embeddings_app import backfill, progress
from embeddings_app.models import BackfillBatch, BackfillRun, EmbeddingVersion
from tests.backfill_helpers import (
    WORKER_ENV,
    assert_every_row_fresh,
    create_articles,
    raw_connection,
    wait_until,
)
from tests.conftest import TARGET
from tests.settings_faults import BATCH_LEASE

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

FAULT_ENV = {**WORKER_ENV, "DJANGO_SETTINGS_MODULE": "tests.settings_faults"}
ROWS = 400
BATCH_SIZE = 40
STORM_SECONDS = 20  # the storm: 20 terminations in 14 s; this one is denser and longer


@pytest.fixture
def short_lease(settings: Any) -> Iterator[str]:
    """This process uses the workers' short lease, and a queue of its own."""
    queue = f"embeddings-faults-{uuid.uuid4().hex[:12]}"
    settings.EMBEDDINGS = {**settings.EMBEDDINGS, "BATCH_LEASE": BATCH_LEASE, "QUEUE": queue}
    yield queue


class Follower(threading.Thread):
    """`manage.py embeddings backfill` (dispatch, then wait, reclaiming) in a thread."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            call_command("embeddings", "backfill", TARGET, "v1", "--batch-size", str(BATCH_SIZE))
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            connections.close_all()

    def finish(self, timeout: float = 600) -> None:
        self.join(timeout)
        assert not self.is_alive(), "the backfill did not finish"
        if self.error is not None:
            raise self.error


def reconnect() -> None:
    """This test's own connection was terminated too: the next query opens a new one."""
    backfill._close_quietly(connection)


def test_a_worker_killed_mid_batch_is_reclaimed_after_its_lease_and_the_backfill_completes(
        short_lease, celery_worker):
    create_articles(ROWS)
    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny")
    doomed = celery_worker(concurrency=1, extra_env=FAULT_ENV, name="doomed")
    follower = Follower()
    follower.start()
    running = wait_until(lambda: BackfillBatch.objects.filter(
        status=BackfillBatch.Status.RUNNING).first(), timeout=300, what="a running batch")
    os.killpg(doomed.process.pid, signal.SIGKILL)  # the whole worker: no requeue, no ack
    doomed.process.wait()
    killed_at = timezone.now()
    # Nobody works on the run now: once the lease has expired, progress says so (no ETA).
    version = EmbeddingVersion.objects.get(target=TARGET, version="v1")
    celery_worker(concurrency=1, extra_env=FAULT_ENV, name="rescuer")
    follower.finish()

    run = BackfillRun.objects.get(version=version)
    assert run.status == BackfillRun.Status.DONE
    reclaimed = list(run.batches.filter(reclaims__gte=1))
    assert [batch.number for batch in reclaimed] == [running.number]
    batch = reclaimed[0]
    assert batch.status == BackfillBatch.Status.DONE and batch.attempts >= 2
    assert "expired" in batch.reclaim_note and "re-dispatched" in batch.reclaim_note
    seconds = (batch.reclaimed_at - killed_at).total_seconds()
    print(f"\nbatch {batch.number} reclaimed {seconds:.1f}s after the SIGKILL "
          f"(lease {BATCH_LEASE}s); note: {batch.reclaim_note}")
    assert assert_every_row_fresh(TARGET, "v1") == ROWS


def test_a_run_whose_only_lease_expired_shows_stalled_and_no_eta(short_lease, celery_worker):
    create_articles(60)
    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny")
    version = EmbeddingVersion.objects.get(target=TARGET, version="v1")
    run, _ = backfill.start(version, batch_size=20)  # dispatched to no worker
    BackfillRun.objects.filter(pk=run.pk).update(rows_processed=20, batches_done=1)
    live = timezone.now() + timezone.timedelta(seconds=BATCH_LEASE)
    BackfillBatch.objects.filter(run=run, number=1).update(
        status=BackfillBatch.Status.RUNNING, lease_expires_at=live)
    assert not progress.statuses([version])[version.pk].stalled  # a worker holds a batch
    past = timezone.now() - timezone.timedelta(seconds=2 * BATCH_LEASE)
    BackfillBatch.objects.filter(run=run, number=1).update(lease_expires_at=past)
    BackfillRun.objects.filter(pk=run.pk).update(updated_at=past, started_at=past)
    status = progress.statuses([version])[version.pk]
    assert status.stalled and status.eta_seconds is None
    assert status.as_json()["rate_label"] == "stalled: no worker holds a batch"
    from io import StringIO

    out = StringIO()
    call_command("embeddings", "status", TARGET, stdout=out)
    assert "stalled" in out.getvalue() and "ETA" not in out.getvalue()


def terminate_every_client(conn: psycopg.Connection) -> int:
    """pg_terminate_backend of every other client session of this database."""
    return conn.execute(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() "
        "AND datname = current_database()").fetchone()[0]


def restart_postgres() -> None:
    """Restart the embedded PostgreSQL (pg_ctl restart -m fast) and wait until it accepts
    connections again. Other tests of this session share it: they start after it is back."""
    from project import services

    # services.restart_postgres re-reads the new postmaster's pid, so pgserver still stops the
    # server when the session ends.
    if services.restart_postgres() is None:
        message = "PostgreSQL is not the embedded server (DATABASE_URL is set): cannot restart it"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)

    def accepts() -> bool:
        try:
            with raw_connection():
                return True
        except psycopg.OperationalError:
            return False

    wait_until(accepts, timeout=60, what="PostgreSQL accepting connections")


def test_connection_storms_and_a_postgres_restart_during_a_backfill_lose_nothing(
        short_lease, celery_worker):
    create_articles(ROWS)
    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny")
    celery_worker(concurrency=2, extra_env=FAULT_ENV)
    follower = Follower()
    follower.start()
    wait_until(lambda: BackfillBatch.objects.filter(
        status=BackfillBatch.Status.RUNNING).exists(), timeout=300, what="a running batch")
    storms, terminated, restarted, storm_ends = 0, 0, False, time.monotonic() + STORM_SECONDS
    killer = raw_connection()
    killer.autocommit = True
    try:
        # A storm of bounded length, as outages are: one storm until the backfill ends would, on
        # a loaded machine, leave no batch any window to finish in (every retry is killed).
        while follower.is_alive() and time.monotonic() < storm_ends:
            terminated += terminate_every_client(killer)
            storms += 1
            if storms == 25 and not restarted:
                killer.close()
                restarted = follower.is_alive()  # restarted while the backfill runs
                restart_postgres()
                killer = raw_connection()
                killer.autocommit = True
            time.sleep(0.15)
    finally:
        killer.close()
    reconnect()
    follower.finish()
    run = BackfillRun.objects.get(version__target=TARGET, version__version="v1")
    print(f"\n{storms} storms ({terminated} sessions terminated), PostgreSQL restarted: "
          f"{restarted}; batches {run.batches_done}/{run.batches_total}, attempts "
          f"{sum(run.batches.values_list('attempts', flat=True))}, reclaims "
          f"{sum(run.batches.values_list('reclaims', flat=True))}")
    assert restarted and storms >= 25
    assert run.status == BackfillRun.Status.DONE, run.last_error
    assert assert_every_row_fresh(TARGET, "v1") == ROWS


def test_psycopgs_own_connection_errors_are_transient_and_the_retry_reconnects(short_lease):
    """A terminated backend surfaces as psycopg's own error where the app talks to the driver
    directly (pgvector's type registration): it is retryable, and the task's Django connection is
    closed so that the retry opens a new one."""
    from embeddings_app import stores, tasks

    connection.close()
    connection.ensure_connection()  # a new session: pgvector's types not registered yet
    with raw_connection() as killer:
        killer.autocommit = True
        killer.execute("SELECT pg_terminate_backend(%s)", [connection.connection.info.backend_pid])

    @tasks.reconnecting
    def register() -> None:
        stores.register_types()

    with pytest.raises(tasks.RETRYABLE) as raised:
        register()
    assert isinstance(raised.value, psycopg.OperationalError)  # not wrapped by Django
    register()  # the retry: a new connection
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)


def test_a_stale_delivery_that_gives_up_does_not_fail_a_batch_another_worker_holds(short_lease):
    """A delivery whose lease expired (its batch reclaimed and re-dispatched) may exhaust its own
    retries later: while another worker holds the batch's live lease, that worker's outcome
    counts. Without a live holder, giving up fails the batch as before."""
    create_articles(40)
    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny")
    version = EmbeddingVersion.objects.get(target=TARGET, version="v1")
    run, _ = backfill.start(version, batch_size=20)  # dispatched to no worker
    live = timezone.now() + timezone.timedelta(seconds=BATCH_LEASE)
    BackfillBatch.objects.filter(run=run, number=0).update(
        status=BackfillBatch.Status.RUNNING, worker="elsewhere:1", lease_expires_at=live)
    backfill.batch_failed(run.pk, 0, "OperationalError: terminating connection")
    batch = BackfillBatch.objects.get(run=run, number=0)
    assert batch.status == BackfillBatch.Status.RUNNING and batch.error == ""
    assert BackfillRun.objects.get(pk=run.pk).batches_done == 0

    expired = timezone.now() - timezone.timedelta(seconds=1)
    BackfillBatch.objects.filter(run=run, number=0).update(lease_expires_at=expired)
    backfill.batch_failed(run.pk, 0, "OperationalError: terminating connection")
    batch = BackfillBatch.objects.get(run=run, number=0)
    assert batch.status == BackfillBatch.Status.FAILED
    assert "terminating connection" in batch.error
