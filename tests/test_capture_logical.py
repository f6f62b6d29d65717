"""Change capture read from the write-ahead log (``EMBEDDINGS["CHANGE_CAPTURE"] = "logical"``,
issue 19): no trigger on the table; the drain collects the keys of the rows written from the
database's logical replication slot, queues those not fresh and refreshes them. Both layouts,
every write path of tests/test_capture.py, on the embedded PostgreSQL (wal_level = logical)."""

from __future__ import annotations

import io
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.db.models import F, Value
from django.db.models.functions import Concat

from embeddings_app import capture, checks, stores, sync, tasks
from embeddings_app.models import EmbeddingVersion
from project.news.models import Article
from tests import test_capture as trigger_tests
from tests.backfill_helpers import raw_connection
from tests.conftest import TARGET
from tests.test_capture import (
    CHANGED,
    ROWS,
    WRITES,
    _update,
    assert_fresh,
    depth,
    drains_at_once,
    field,
    table_reads,
)

pytestmark = pytest.mark.django_db(transaction=True)

# The trigger tests' set-up, the same rows and versions (added here with the logical capture).
captured = trigger_tests.captured
two_versions = trigger_tests.two_versions


@pytest.fixture(autouse=True)
def logical(settings: Any) -> None:
    settings.EMBEDDINGS = {**settings.EMBEDDINGS, "CHANGE_CAPTURE": "logical"}


@pytest.fixture
def backfilled(two_versions: list[Article]) -> list[Article]:
    """``two_versions``, with what its backfills wrote collected: in the column layout every
    vector written is an update of the user's table, which the log names too; each is read back
    by primary key, found fresh and queued nowhere."""
    collected = capture.collect()
    assert collected.queued == 0 and depth() == 0 and pending_changes() == 0
    assert collected.changes == (2 * ROWS if EmbeddingVersion.objects.filter(
        target=TARGET, layout="column").count() == 2 else 0)
    return two_versions


def assert_only_own_writes_pending(layout: str, rows: int) -> None:
    """What the slot still holds is the drain's own writes of ``rows`` rows' vectors in both
    versions (the column layout writes them into the user's table: the log names them too), and
    collecting them queues nothing."""
    assert pending_changes() == (2 * rows if layout == "column" else 0)
    assert capture.collect().queued == 0 and depth() == 0 and pending_changes() == 0


def slot() -> stores.CaptureSlot:
    return stores.CaptureSlot()


def triggers_on_articles() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'news_article'::regclass "
                       "AND NOT tgisinternal")
        return int(cursor.fetchone()[0])


def published_columns() -> list[str] | None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT attnames FROM pg_publication_tables WHERE pubname = %s "
                       "AND tablename = 'news_article'", [stores.CaptureSlot.publication])
        row = cursor.fetchone()
    return None if row is None else list(row[0])


def pending_changes() -> int:
    """Changes of the captured tables the slot still holds (a peek: nothing consumed)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, "
                       "'proto_version', '1', 'publication_names', %s) "
                       "WHERE substr(data, 1, 1) IN ('\\x49'::bytea, '\\x55'::bytea)",
                       [slot().name, stores.CaptureSlot.publication])
        return int(cursor.fetchone()[0])


def test_add_creates_the_slot_and_publishes_the_key_alone_with_no_trigger(captured):
    assert slot().exists() and slot().wal_level() == "logical"
    assert published_columns() == ["id"]  # the key only: the log's detail stays small
    assert triggers_on_articles() == 0  # the writers pay nothing of ours
    assert capture.installed(field()) and isinstance(capture.queue(field()),
                                                     stores.LogicalChangeQueue)


# One batch or fewer found by a read of the slot: the collect refreshes them itself. More: they
# are queued, for every worker's drains to share (batch_size=4 < CHANGED).
PATHS = {"refreshed by the collect": None, "queued for the drain batches": 4}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("write", list(WRITES))
def test_rows_written_without_signals_are_fresh_in_every_version_after_one_drain_without_a_scan(
        backfilled, layout, write, path):
    pks = WRITES[write](backfilled)
    assert len(pks) == CHANGED
    assert depth() == 0 and pending_changes() == CHANGED  # in the log, not yet collected
    versions = list(EmbeddingVersion.objects.filter(target=TARGET).order_by("version"))
    assert all(missing | stale == set(pks) for missing, stale in sync.unfresh_rows(field(), versions))

    seq_before, idx_before = table_reads()
    stats = capture.drain(field(), batch_size=PATHS[path])
    seq_after, idx_after = table_reads()

    assert stats.collected is not None and stats.collected.changes == CHANGED
    queued = CHANGED if PATHS[path] else 0
    assert (stats.collected.queued, stats.entries) == (queued, queued)
    assert stats.collected.refreshed.processed == CHANGED - queued
    assert (stats.rows_read, stats.written) == (CHANGED, 2 * CHANGED)
    assert depth() == 0
    assert_only_own_writes_pending(layout, CHANGED)  # the slot moved past the changes
    # No full scan: the collect and the drain read the changed rows by primary key only.
    assert seq_after - seq_before == 0
    assert 0 < idx_after - idx_before <= 8 * CHANGED
    assert_fresh(pks)
    assert tasks.sweep(TARGET, full_scan=True) == {TARGET: 0}


def test_an_update_of_another_column_or_of_the_same_text_queues_nothing(backfilled):
    pks = [a.pk for a in backfilled[:50]]
    Article.objects.filter(pk__in=pks).update(category="other")
    Article.objects.filter(pk__in=pks).update(title=F("title"))
    with raw_connection() as other:
        other.execute("UPDATE news_article SET title = title, body = body, category = 'x'")
        other.commit()
    article = Article.objects.get(pk=pks[0])
    article.save()  # every column written, none changed (and its dual-write keeps it fresh)
    assert pending_changes() == 50 + 50 + ROWS + 1  # the log names every row written...
    collected = capture.collect()
    assert collected.changes == 50 + 50 + ROWS + 1
    assert collected.queued == 0 and depth() == 0  # ...and none is queued: all are fresh
    assert pending_changes() == 0
    Article.objects.filter(pk=pks[1]).update(title="A new title")
    assert capture.collect().queued == 1 and depth() == 1  # the same path does queue a change


def test_a_collect_that_fails_before_or_after_queueing_loses_nothing(backfilled, layout,
                                                                    monkeypatch):
    pks = _update(backfilled)
    # Fails before its entries commit: nothing queued, the slot where it was.
    monkeypatch.setattr(capture, "_queue_stale", lambda *args, **kwargs: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        capture.collect()
    monkeypatch.undo()
    assert depth() == 0 and pending_changes() == CHANGED
    # Fails after its entries committed, before the slot moved: read again, queued twice.
    monkeypatch.setattr(stores.CaptureSlot, "sql_advance", "SELECT 1 / 0, %s, %s")
    with pytest.raises(Exception, match="division by zero"):
        capture.collect()
    monkeypatch.undo()
    assert depth() == CHANGED and pending_changes() == CHANGED
    stats = capture.drain(field())
    # The same changes, read again: refreshed by the collect (one batch); the queued twins are
    # drained and found fresh.
    assert stats.collected.refreshed.processed == CHANGED and stats.entries == CHANGED
    assert stats.written == 2 * CHANGED  # each row encoded once per version; the twin is fresh
    assert depth() == 0
    assert_only_own_writes_pending(layout, CHANGED)
    assert_fresh(pks)
    # A drain whose collect refreshed the rows itself, then failed to move the slot: the rows
    # are fresh, and the next drain reads the same changes, finds them fresh and moves on.
    pks = _update(backfilled)
    monkeypatch.setattr(stores.CaptureSlot, "sql_advance", "SELECT 1 / 0, %s, %s")
    with pytest.raises(Exception, match="division by zero"):
        capture.drain(field())
    monkeypatch.undo()
    assert_fresh(pks)
    own_writes = 2 * CHANGED if layout == "column" else 0
    assert pending_changes() == CHANGED + own_writes and depth() == 0
    again = capture.drain(field())
    assert again.collected.changes == CHANGED + own_writes
    assert (again.collected.queued, again.collected.refreshed.embedded, again.written) == (0, 0, 0)
    assert pending_changes() == 0


def test_a_change_committed_while_a_collect_reads_is_collected_by_the_next(backfilled, layout,
                                                                           monkeypatch):
    pks = _update(backfilled)
    victim = pks[3]
    original = capture._queue_stale
    fired: list[bool] = []

    def queue_then_write_behind(*args: Any, **kwargs: Any) -> None:
        original(*args, **kwargs)
        if not fired:
            fired.append(True)
            with raw_connection() as other:
                other.execute("UPDATE news_article SET title = 'Changed during the collect' "
                              "WHERE id = %s", [victim])
                other.commit()

    monkeypatch.setattr(capture, "_queue_stale", queue_then_write_behind)
    first = capture.collect()
    assert fired and first.queued == CHANGED
    assert pending_changes() == 1  # the later transaction is past where the slot moved
    assert capture.drain(field()).collected.changes == 1 and depth() == 0
    assert_only_own_writes_pending(layout, CHANGED)  # the victim is one of the ten
    assert_fresh(pks)


def test_concurrent_drains_collect_once_and_every_row_ends_fresh(backfilled, layout):
    pks = [a.pk for a in backfilled[:300]]
    Article.objects.filter(pk__in=pks).update(body=Concat("body", Value(" More.")))
    results = drains_at_once()
    assert sum(stats.collected.queued for stats in results) == 300  # each change queued once
    assert sum(stats.entries for stats in results) <= 300
    capture.drain(field())  # a drain that skipped the collect may have ended before the queue
    assert depth() == 0
    assert capture.collect().queued == 0 and pending_changes() == 0
    assert_fresh(pks)


def test_the_last_version_dropped_removes_the_publication_and_the_slot(captured):
    for name in ("v1", "v2"):
        call_command("embeddings", "retire", TARGET, name)
    call_command("embeddings", "drop", TARGET, "v1", "--yes")
    assert slot().exists() and published_columns() == ["id"]  # v2 is still stored
    call_command("embeddings", "drop", TARGET, "v2", "--yes")
    assert not slot().exists() and published_columns() is None
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_publication WHERE pubname = %s",
                       [stores.CaptureSlot.publication])
        assert cursor.fetchone()[0] == 0
    assert stores.LogicalChangeQueue(field()).queue not in connection.introspection.table_names()


def test_status_and_the_admin_show_the_queue_and_the_wal_left_to_collect(backfilled, client):
    from django.contrib.auth.models import User

    _update(backfilled)
    out = io.StringIO()
    call_command("embeddings", "status", TARGET, stdout=out)
    assert f"{TARGET}: change queue empty; " in out.getvalue()
    assert " of WAL to collect" in out.getvalue()  # written, not yet collected
    capture.collect()
    with connection.cursor() as cursor:  # the oldest entry's time is its transaction's commit
        cursor.execute(f"SELECT max(queued_at) <= now() FROM {stores.LogicalChangeQueue(field()).queue}")
        assert cursor.fetchone()[0]
    User.objects.create_superuser("boss", password="pw-for-tests")
    client.login(username="boss", password="pw-for-tests")
    page = client.get("/admin/embeddings_app/embeddingversion/").content.decode()
    assert page.count(f"{CHANGED} rows, oldest ") == 2
    capture.drain(field())
    out = io.StringIO()
    call_command("embeddings", "status", TARGET, stdout=out)
    assert f"{TARGET}: change queue empty" in out.getvalue()


def test_check_deploy_warns_of_a_slot_holding_too_much_wal(backfilled, monkeypatch):
    _update(backfilled)
    err = io.StringIO()
    call_command("check", "--deploy", stderr=err)
    assert "embeddings.W123" not in err.getvalue() and "embeddings.W121" not in err.getvalue()
    monkeypatch.setattr(checks, "SLOT_BACKLOG_WARNING", 0)
    err = io.StringIO()
    call_command("check", "--deploy", stderr=err)
    assert "embeddings.W123" in err.getvalue() and "of write-ahead log" in err.getvalue()


def test_the_capture_command_switches_between_the_trigger_and_the_log(backfilled, settings):
    settings.EMBEDDINGS = {**settings.EMBEDDINGS, "CHANGE_CAPTURE": True}
    err = io.StringIO()
    call_command("check", "--deploy", stderr=err)
    assert "embeddings.W121" in err.getvalue() and "installed another way" in err.getvalue()
    # Written while the log is still the way: queued by the switch's last collect, not lost.
    Article.objects.filter(pk=backfilled[2].pk).update(title="Written before the switch")
    call_command("embeddings", "capture", TARGET)
    assert triggers_on_articles() == 2 and published_columns() is None
    assert depth() == 1
    assert not slot().exists()  # no table left in the publication: slot and publication gone
    Article.objects.filter(pk=backfilled[0].pk).update(title="Queued by the trigger")
    assert depth() == 2

    settings.EMBEDDINGS = {**settings.EMBEDDINGS, "CHANGE_CAPTURE": "logical"}
    out = io.StringIO()
    call_command("embeddings", "capture", TARGET, stdout=out)
    assert "read from the write-ahead log by the slot" in out.getvalue()
    assert triggers_on_articles() == 0 and published_columns() == ["id"]
    assert depth() == 2  # the queue is the same table: the trigger's entries are still drained
    Article.objects.filter(pk=backfilled[1].pk).update(title="Read from the log")
    stats = capture.drain(field())
    assert (stats.collected.refreshed.processed, stats.entries) == (1, 2)
    assert_fresh([backfilled[0].pk, backfilled[1].pk, backfilled[2].pk])


def test_a_table_without_a_replica_identity_is_refused_and_a_full_one_published_whole(
        make_articles):
    make_articles(3)
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE news_article REPLICA IDENTITY NOTHING")
    try:
        with pytest.raises(CommandError, match="REPLICA IDENTITY NOTHING"):
            call_command("embeddings", "add", TARGET, "v1", "--model", "tiny")
        assert not EmbeddingVersion.objects.exists()  # nothing added
        with connection.cursor() as cursor:
            cursor.execute("ALTER TABLE news_article REPLICA IDENTITY FULL")
        call_command("embeddings", "add", TARGET, "v1", "--model", "tiny")
        call_command("embeddings", "backfill", TARGET, "v1", "--inline")
        assert "id" in published_columns() and "body" in published_columns()
        first = Article.objects.order_by("pk").first()
        Article.objects.filter(pk=first.pk).update(body="A new body, read from the whole row.")
        stats = capture.drain(field())
        assert (stats.collected.refreshed.processed, stats.written) == (1, 1)
        assert_fresh([first.pk])
    finally:
        with connection.cursor() as cursor:
            cursor.execute("ALTER TABLE news_article REPLICA IDENTITY DEFAULT")
