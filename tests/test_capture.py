"""Change capture (issue 19): every write of the source columns is caught by a trigger and
queued, whatever wrote it, and one drain makes the rows fresh in every written version, reading
only the queued rows. Both layouts."""

from __future__ import annotations

import io
import os
import signal
import threading
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError, SystemCheckError
from django.db import connection
from django.db.models import F, Value
from django.db.models.functions import Concat

from embeddings_app import capture, registry, stores, sync, tasks
from embeddings_app.models import EmbeddingVersion
from project.news.models import Article
from tests.backfill_helpers import (
    assert_every_row_fresh,
    create_articles,
    raw_connection,
    wait_until,
)
from tests.conftest import TARGET

pytestmark = pytest.mark.django_db(transaction=True)

# Enough rows that PostgreSQL reads a few of them by primary key, not by a sequential scan: the
# counters of rows read then show whether a drain read the table or only the queued rows.
ROWS = 1500
CHANGED = 10


def field() -> Any:
    return registry.get(TARGET)


def queue() -> stores.ChangeQueue:
    return stores.ChangeQueue(field())


def depth() -> int:
    return queue().stats()[0]


def table_reads() -> tuple[int, int]:
    """(rows read by sequential scans, rows fetched through indexes) of the articles' table so
    far, every backend's statistics included (this one's flushed first)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_force_next_flush()")
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute("SELECT coalesce(seq_tup_read, 0), coalesce(idx_tup_fetch, 0) "
                       "FROM pg_stat_user_tables WHERE relid = 'news_article'::regclass")
        seq, idx = cursor.fetchone()
    return int(seq), int(idx)


def assert_fresh(pks: list[Any]) -> None:
    """Every row's stored hash is its current text's in both versions (a read of the whole
    table, no encode), and the vectors of the rows ``pks`` equal a fresh encode of their text."""
    from embeddings_app import encoders

    versions = list(EmbeddingVersion.objects.filter(target=TARGET).order_by("version"))
    assert sync.unfresh_rows(field(), versions) == [(set(), set())] * len(versions)
    rows = list(field().source_queryset().filter(pk__in=pks).order_by("pk"))
    texts = [field().source_text(row) for row in rows]
    for version in versions:
        expected = encoders.for_version(version).encode_documents(texts)
        for row, vector in zip(rows, expected, strict=True):
            np.testing.assert_allclose(version.store.read_vector(row.pk), vector, atol=2e-5)


@pytest.fixture
def captured() -> list[Article]:
    """ROWS short articles, two versions added (v1, v2: nothing written yet), an empty queue."""
    Article.objects.bulk_create([Article(title=f"Headline {i}", body=f"Short report number {i}.",
                                         category="test") for i in range(ROWS)], batch_size=1000)
    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny")
    call_command("embeddings", "add", TARGET, "v2", "--model", "tiny_other")
    assert depth() == 0  # installed by the first add, after the rows were written
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE news_article")
    return list(Article.objects.order_by("pk"))


@pytest.fixture
def two_versions(layout: str, captured: list[Article]) -> list[Article]:
    """``captured``, both versions backfilled (in the layout of the test's parameter)."""
    call_command("embeddings", "backfill", TARGET, "v1", "--inline", "--batch-size", "1000")
    call_command("embeddings", "backfill", TARGET, "v2", "--inline", "--batch-size", "1000")
    assert depth() == 0  # writing vectors touches no source column
    return captured


def _update(articles: list[Article]) -> list[Any]:
    pks = [a.pk for a in articles[:CHANGED]]
    Article.objects.filter(pk__in=pks).update(title=Concat("title", Value(" (updated)")))
    return pks


def _bulk_update(articles: list[Article]) -> list[Any]:
    changed = articles[100:100 + CHANGED]
    for article in changed:
        article.body = f"Rewritten by a bulk import: {article.body}"
    Article.objects.bulk_update(changed, ["body"])
    return [a.pk for a in changed]


def _bulk_create(articles: list[Article]) -> list[Any]:
    created = Article.objects.bulk_create([Article(title=f"New headline {i}", body=f"New {i}.")
                                           for i in range(CHANGED)])
    return [a.pk for a in created]


def _raw_sql_from_another_connection(articles: list[Article]) -> list[Any]:
    pks = [a.pk for a in articles[200:200 + CHANGED]]
    with raw_connection() as other:  # another client, as another service would be
        other.execute("UPDATE news_article SET body = 'Edited by another service: ' || body "
                      "WHERE id = ANY(%s)", [pks])
        other.commit()
    return pks


def _copy(articles: list[Article]) -> list[Any]:
    with raw_connection() as other:
        with other.cursor() as cursor:
            with cursor.copy("COPY news_article (title, body, category) FROM STDIN") as copy:
                for i in range(CHANGED):
                    copy.write_row((f"Copied headline {i}", f"Loaded by COPY {i}.", "copy"))
            cursor.execute("SELECT id FROM news_article WHERE category = 'copy' ORDER BY id")
            pks = [row[0] for row in cursor.fetchall()]
        other.commit()
    return pks


WRITES: dict[str, Callable[[list[Article]], list[Any]]] = {
    "QuerySet.update": _update, "bulk_update": _bulk_update, "bulk_create": _bulk_create,
    "raw SQL from another connection": _raw_sql_from_another_connection, "COPY": _copy,
}


@pytest.mark.parametrize("write", list(WRITES))
def test_rows_written_without_signals_are_fresh_in_every_version_after_one_drain_without_a_scan(
        two_versions, write):
    pks = WRITES[write](two_versions)
    assert len(pks) == CHANGED
    assert depth() == CHANGED  # one entry per row written
    versions = list(EmbeddingVersion.objects.filter(target=TARGET).order_by("version"))
    unfresh = sync.unfresh_rows(field(), versions)
    assert all(missing | stale == set(pks) for missing, stale in unfresh)

    seq_before, idx_before = table_reads()
    stats = capture.drain(field())
    seq_after, idx_after = table_reads()

    assert (stats.entries, stats.rows_read, stats.written) == (CHANGED, CHANGED, 2 * CHANGED)
    assert depth() == 0
    # No full scan: not one row of the table read sequentially; a few index fetches per
    # changed row (the read, the compare-and-set write), far from the table's size.
    assert seq_after - seq_before == 0
    assert 0 < idx_after - idx_before <= 6 * CHANGED
    assert_fresh(pks)
    # The safety net finds nothing left, and the same counters do see its read of every row.
    assert tasks.sweep(TARGET, full_scan=True) == {TARGET: 0}
    assert table_reads()[0] - seq_after >= ROWS + CHANGED


def test_an_update_of_another_column_or_of_the_same_text_queues_nothing(captured):
    article = captured[0]
    Article.objects.filter(pk__in=[a.pk for a in captured[:50]]).update(category="other")
    Article.objects.filter(pk__in=[a.pk for a in captured[:50]]).update(title=F("title"))
    with raw_connection() as other:
        other.execute("UPDATE news_article SET title = title, body = body, category = 'x'")
        other.commit()
    article.refresh_from_db()
    article.save()  # every column written, none changed
    assert depth() == 0
    Article.objects.filter(pk=article.pk).update(title="A new title")
    assert depth() == 1  # the same path does queue a change


def test_a_change_committed_while_a_drain_works_is_not_lost(two_versions, monkeypatch):
    pks = _update(two_versions)
    victim = pks[3]
    original = sync.prepare
    fired: list[bool] = []

    def prepare_then_write_behind(*args: Any, **kwargs: Any) -> Any:
        prepared = original(*args, **kwargs)  # the batch's texts are read and encoded...
        if not fired:  # ...when another client changes one of its rows again and commits
            fired.append(True)
            with raw_connection() as other:
                other.execute("UPDATE news_article SET title = 'Changed during the drain' "
                              "WHERE id = %s", [victim])
                other.commit()
        return prepared

    monkeypatch.setattr(sync, "prepare", prepare_then_write_behind)
    first = capture.drain(field())
    assert fired and first.entries == CHANGED + 1  # its own 10, then the newer change's
    assert first.refreshed.conflicted >= 1  # the older text's vector was not written...
    assert depth() == 0  # ...and the newer change's entry was drained in its turn
    assert_fresh(pks)


def test_two_drains_never_take_the_same_entries(captured):
    Article.objects.filter(pk__in=[a.pk for a in captured[:60]]).update(
        title=Concat("title", Value("!")))
    first, second = raw_connection(), raw_connection()
    try:
        with first.cursor() as a, second.cursor() as b:
            taken_a = queue().claim(a, 40)
            taken_b = queue().claim(b, 40)  # while the first still holds its 40
        assert len(taken_a) == 40 and len(taken_b) == 20
        assert not {e for e, _ in taken_a} & {e for e, _ in taken_b}
    finally:
        first.rollback()
        second.rollback()
        first.close()
        second.close()
    assert depth() == 60  # nothing deleted: rolled-back claims leave every entry


def drains_at_once(count: int = 3, batch_size: int = 20) -> list[capture.DrainStats]:
    """``count`` drains of the target started together, each in a thread (and a connection) of
    its own; fails on the first drain that raised. Returns what each did."""
    results: list[capture.DrainStats] = []
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def run() -> None:
        try:
            start.wait()
            results.append(capture.drain(field(), batch_size=batch_size))
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors, errors
    return results


def test_concurrent_drains_share_the_queue_and_every_row_ends_fresh(two_versions):
    pks = [a.pk for a in two_versions[:300]]
    Article.objects.filter(pk__in=pks).update(body=Concat("body", Value(" More.")))
    results = drains_at_once()
    assert len(results) == 3 and sum(stats.entries for stats in results) == 300  # each once
    assert depth() == 0
    assert_fresh(pks)


def test_the_first_version_installs_capture_and_the_last_dropped_removes_it(make_articles):
    make_articles(3)
    assert not queue().installed()
    assert capture.drain(field()).as_dict()["entries"] == 0  # a scheduled drain before any add
    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny")
    assert queue().installed()
    call_command("embeddings", "add", TARGET, "v2", "--model", "tiny")
    for name in ("v1", "v2"):
        call_command("embeddings", "retire", TARGET, name)
    call_command("embeddings", "drop", TARGET, "v1", "--yes")
    assert queue().installed()  # v2 is still stored
    call_command("embeddings", "drop", TARGET, "v2", "--yes")
    assert not queue().installed()
    assert queue().queue not in connection.introspection.table_names()
    Article.objects.filter(pk__gt=0).update(title="No trigger fires now")


def test_status_shows_the_queue_depth_and_the_age_of_its_oldest_entry(captured):
    _update(captured)
    with connection.cursor() as cursor:  # the oldest entry is a minute old
        cursor.execute(f"UPDATE {queue().queue} SET queued_at = now() - interval '61 seconds' "
                       f"WHERE id = (SELECT min(id) FROM {queue().queue})")
    out = io.StringIO()
    call_command("embeddings", "status", TARGET, stdout=out)
    assert f"{TARGET}: change queue 10 rows, oldest 61." in out.getvalue()
    capture.drain(field())
    out = io.StringIO()
    call_command("embeddings", "status", TARGET, stdout=out)
    assert f"{TARGET}: change queue empty" in out.getvalue()


def test_the_admin_list_shows_each_targets_queue_depth_and_oldest_entry(captured, client):
    from django.contrib.auth.models import User

    User.objects.create_superuser("boss", password="pw-for-tests")
    client.login(username="boss", password="pw-for-tests")
    _update(captured)
    page = client.get("/admin/embeddings_app/embeddingversion/").content.decode()
    assert page.count("10 rows, oldest ") == 2  # one cell per version of the target
    ids = list(EmbeddingVersion.objects.values_list("pk", flat=True))
    status = client.get("/admin/embeddings_app/embeddingversion/status/", {"id": ids}).json()
    assert all(v["change_queue"].startswith("10 rows, oldest ")  # the cells' live refresh
               for v in status["versions"].values())
    capture.drain(field())
    page = client.get("/admin/embeddings_app/embeddingversion/").content.decode()
    assert "10 rows, oldest " not in page and page.count('data-ev-field="change_queue"') == 2
    status = client.get("/admin/embeddings_app/embeddingversion/status/", {"id": ids}).json()
    assert [v["change_queue"] for v in status["versions"].values()] == ["empty", "empty"]


def test_the_capture_command_removes_and_reinstalls_it_and_check_deploy_warns_meanwhile(
        captured):
    call_command("embeddings", "backfill", TARGET, "v1", "--inline", "--batch-size", "1000")
    call_command("embeddings", "capture", TARGET, "--remove")
    assert not queue().installed()
    err = io.StringIO()
    call_command("check", "--deploy", stderr=err)
    assert "embeddings.W121" in err.getvalue() and f"embeddings capture {TARGET}" in err.getvalue()
    out = io.StringIO()
    call_command("embeddings", "status", TARGET, stdout=out)
    assert "change capture not installed: the sweep reads every row" in out.getvalue()
    Article.objects.filter(pk=captured[0].pk).update(title="Not captured")
    assert tasks.sweep(TARGET) == {TARGET: 1}  # found by the full scan instead

    out = io.StringIO()
    call_command("embeddings", "capture", TARGET, stdout=out)
    assert "queued in news_article_embedding__changes" in out.getvalue()
    err = io.StringIO()
    call_command("check", "--deploy", stderr=err)
    assert "embeddings.W121" not in err.getvalue()
    Article.objects.filter(pk=captured[1].pk).update(title="Captured again")
    assert depth() == 1


def test_a_callable_source_is_not_captured_and_check_deploy_says_to_call_sync(db):
    ticket = "news.Ticket.embedding"
    call_command("embeddings", "add", ticket, "v1", "--model", "tiny")
    assert not stores.ChangeQueue(registry.get(ticket)).installed()
    err = io.StringIO()
    call_command("check", "--deploy", stderr=err)
    assert "embeddings.W120" not in err.getvalue()  # nothing written yet: nothing to warn about
    call_command("embeddings", "backfill", ticket, "v1", "--inline")  # no rows: ready at once
    call_command("check", "--deploy", stderr=err)
    assert "embeddings.W120" in err.getvalue()
    assert "its source is a callable" in err.getvalue() and "Ticket.embedding.sync(" in err.getvalue()
    with pytest.raises(CommandError, match="cannot be captured: its source is a callable"):
        call_command("embeddings", "capture", ticket)


@pytest.mark.parametrize(("key", "value", "check_id", "allowed"), [
    ("CHANGE_CAPTURE", "yes", "embeddings.E060", 'True, False, "trigger" or "logical"'),
    ("SWEEP_FULL_SCAN", 1, "embeddings.E061", "True or False")])
def test_bad_capture_settings_are_reported_by_check(settings, key, value, check_id, allowed):
    settings.EMBEDDINGS = {**settings.EMBEDDINGS, key: value}
    with pytest.raises(SystemCheckError) as failure:
        call_command("check")
    assert check_id in str(failure.value)
    assert f'EMBEDDINGS["{key}"] must be {allowed}, not {value!r}' in str(failure.value)


def test_with_capture_off_add_installs_nothing_and_the_sweep_scans(settings, make_articles):
    settings.EMBEDDINGS = {**settings.EMBEDDINGS, "CHANGE_CAPTURE": False}
    make_articles(3)
    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny")
    assert not queue().installed()
    call_command("embeddings", "backfill", TARGET, "v1", "--inline")
    Article.objects.filter(pk=Article.objects.first().pk).update(title="Found by a scan")
    assert tasks.sweep(TARGET) == {TARGET: 1}


@pytest.mark.worker
@pytest.mark.parametrize("mode", ["trigger", "logical"])
def test_a_worker_killed_mid_drain_loses_no_entry(settings, celery_worker, mode):
    settings.EMBEDDINGS = {**settings.EMBEDDINGS, "QUEUE": f"embeddings-{uuid.uuid4().hex[:8]}",
                           "CHANGE_CAPTURE": True if mode == "trigger" else "logical"}
    create_articles(400)  # real articles: a batch of 128 takes a while to encode
    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny")
    call_command("embeddings", "backfill", TARGET, "v1", "--inline", "--batch-size", "400")
    if mode == "logical":
        capture.collect()  # what the column layout's backfill wrote: read, fresh, not queued
    Article.objects.update(title=Concat("title", Value(" (corrected)")))
    # The trigger queued every row; the log holds them until the worker's drain collects them.
    assert depth() == (400 if mode == "trigger" else 0)
    worker = celery_worker(concurrency=1,
                           extra_env={"EMBEDDINGS_TEST_CHANGE_CAPTURE": mode})
    tasks.drain.apply_async((TARGET,), queue=settings.EMBEDDINGS["QUEUE"])

    def claiming() -> bool:  # a drain batch holds its entries (its claim's table lock)
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_locks WHERE relation = %s::regclass "
                           "AND mode = 'RowShareLock' AND granted", [queue().queue])
            return cursor.fetchone()[0] > 0

    wait_until(claiming, timeout=120, what="a drain batch holding its entries")
    os.killpg(worker.process.pid, signal.SIGKILL)  # the whole worker, mid-batch
    worker.process.wait()
    wait_until(lambda: not claiming(), timeout=30, what="the killed claim to be rolled back")
    left = depth()
    assert left > 0
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT DISTINCT row_key FROM {queue().queue}")
        queued = {row[0] for row in cursor.fetchall()}
    ((missing, stale),) = sync.unfresh_rows(field(), [EmbeddingVersion.objects.get(version="v1")])
    assert not missing and stale and stale <= queued  # every row not yet fresh is still queued
    stats = capture.drain(field())  # the next drain
    assert stats.entries == left and depth() == 0
    if mode == "logical":  # the worker's collect had moved the slot past the update
        assert stats.collected.queued == 0
    assert assert_every_row_fresh(TARGET, "v1") == 400
