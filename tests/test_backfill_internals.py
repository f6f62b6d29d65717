"""Pieces of the backfill's read and write path: range planning, the source read without model
instances, and the compare-and-set on the row version (xmin)."""

from __future__ import annotations

import threading

import pytest
from django.core.management import call_command
from django.db import connections, transaction

from embeddings_app import backfill, lifecycle, registry, sources, stores, sync
from embeddings_app.models import EmbeddingVersion, State
from project.news.models import Article
from tests.conftest import TARGET

pytestmark = pytest.mark.usefixtures("layout")  # both layouts


def _version(make_articles, count: int) -> tuple[list[Article], EmbeddingVersion]:
    """A version being backfilled (so written: a write to a version no longer written is
    skipped, see sync.still_written)."""
    articles = make_articles(count)
    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny")
    version = EmbeddingVersion.objects.get(target=TARGET, version="v1")
    with transaction.atomic():
        lifecycle.transition(version, State.BACKFILLING, note="test: being backfilled")
    return articles, version


@pytest.mark.django_db(transaction=True)
def test_plan_ranges_of_one_row_each(make_articles):
    articles, version = _version(make_articles, 3)
    pks = sorted(a.pk for a in articles)
    assert backfill.plan_ranges(version, 1) == [(None, pks[1]), (pks[1], pks[2]), (pks[2], None)]
    assert backfill.plan_ranges(version, 2) == [(None, pks[2]), (pks[2], None)]
    assert backfill.plan_ranges(version, 3) == [(None, None)]


@pytest.mark.parametrize("joined_by", ["postgresql", "python"])
@pytest.mark.django_db(transaction=True)
def test_source_read_from_values_is_the_fields_source_text(make_articles, monkeypatch,
                                                           joined_by):
    """The source text read without model instances, joined by PostgreSQL (text columns) or
    by Python (the path for other column types), is exactly ``source_text``'s."""
    articles, version = _version(make_articles, 4)
    Article.objects.filter(pk=articles[0].pk).update(title="")
    Article.objects.filter(pk=articles[1].pk).update(body="")
    Article.objects.filter(pk=articles[2].pk).update(title=" ", body="x")
    Article.objects.filter(pk=articles[3].pk).update(title="Café ☕ \u00e9\u0301", body="")
    field = registry.get(TARGET)
    assert sources.source_text_sql(field, ("title", "body")) is not None
    if joined_by == "python":
        monkeypatch.setattr(sources, "source_text_sql", lambda *args: None)
    ((page, last),) = list(sources.iter_source_pages(field, [version], field.source_queryset(), 10))
    assert last and len(page) == 4
    expected = {obj.pk: field.source_text(obj) for obj in field.source_queryset()}
    assert {pk: text for pk, text, _, _ in page} == expected
    assert all(stored == (None,) and xmin for _, _, stored, xmin in page)


def _assert_written_all_but(left: object, prepared: sync.Prepared, version: EmbeddingVersion,
                            articles: list[Article]) -> None:
    """The write left row ``left`` alone (conflicted: no hash) and wrote every other row with
    the hash of its current text."""
    field = registry.get(TARGET)
    assert (prepared.stats.embedded, prepared.stats.conflicted) == (len(articles) - 1, 1)
    stored = stores.stored_hashes(field, [version], [a.pk for a in articles])
    assert stored[left] == (None,)
    for obj in field.source_queryset().exclude(pk=left):
        assert stored[obj.pk] == (field.source_hash(field.source_text(obj)),)


@pytest.mark.django_db(transaction=True)
def test_write_rereads_only_rows_whose_version_changed(make_articles):
    """After the read: one row's text changes without a signal (not written: conflicted), one
    row changes elsewhere (new xmin, same text: re-read under the lock, written)."""
    articles, version = _version(make_articles, 5)
    field = registry.get(TARGET)
    ((page, _),) = list(sources.iter_source_pages(field, [version], field.source_queryset(), 10))
    prepared = sync.prepare(field, [version], page)
    changed_text, changed_other = articles[0].pk, articles[1].pk
    Article.objects.filter(pk=changed_text).update(title="Another text altogether")
    Article.objects.filter(pk=changed_other).update(category="moved")
    with transaction.atomic():
        sync.write_prepared(field, prepared)
    _assert_written_all_but(changed_text, prepared, version, articles)


@pytest.mark.django_db(transaction=True)
def test_unfresh_scan_without_server_side_cursors_pages_by_key(make_articles, monkeypatch):
    """With DISABLE_SERVER_SIDE_CURSORS (transaction pooling) the scan reads keyset pages instead
    of one cursor, and finds the same rows."""
    from django.db import connection

    articles, version = _version(make_articles, 7)
    call_command("embeddings", "backfill", TARGET, "v1", "--inline")
    Article.objects.filter(pk__in=[a.pk for a in articles[:3]]).update(title="Changed by bulk")
    field = registry.get(TARGET)
    expected = sync.unfresh_rows(field, [version])
    monkeypatch.setitem(connection.settings_dict, "DISABLE_SERVER_SIDE_CURSORS", True)
    monkeypatch.setattr(sources, "SCAN_CHUNK", 2)  # several pages
    assert sync.unfresh_rows(field, [version]) == expected == [(set(),
                                                                {a.pk for a in articles[:3]})]


def _rows_read(monkeypatch) -> list:
    """From now on, the key of every row a source read decodes (batch pages, scans, re-reads)."""
    read: list = []
    real_source_query = sources.source_query

    def recording_source_query(*args):
        query, decode = real_source_query(*args)

        def decode_and_record(values):
            row = decode(values)
            read.append(row[0])
            return row

        return query, decode_and_record

    monkeypatch.setattr(sources, "source_query", recording_source_query)
    return read


@pytest.mark.django_db(transaction=True)
def test_catch_up_rereads_only_rows_other_transactions_wrote(make_articles, monkeypatch, layout):
    """The run's catch-up pass reads again only the rows that changed since their batch wrote
    them (column: the row's version (xmin) is not a batch's write; table: it is not the version
    its vector was written against): here two rows changed with QuerySet.update() (no
    dual-write) after their batch had written them. They are re-embedded; the other 28 rows
    are not read again."""
    from django.db.models import Value
    from django.db.models.functions import Concat

    from embeddings_app.models import BackfillRun, State
    from tests.backfill_helpers import assert_every_row_fresh

    articles, version = _version(make_articles, 30)
    run, ranges = backfill.start(version, batch_size=10, mode="inline")
    assert len(ranges) == 3
    changed = sorted(a.pk for a in articles)[:2]  # in the first batch
    read = _rows_read(monkeypatch)
    real_catch_up = backfill._catch_up
    bulk_updated: list[bool] = []

    def catch_up(*args):
        read.clear()  # from here on: what the catch-up pass reads
        real_catch_up(*args)

    def after_batch(_processed: int) -> None:
        if not bulk_updated:
            Article.objects.filter(pk__in=changed).update(title=Concat("title", Value(" (bulk)")))
            bulk_updated.append(True)

    monkeypatch.setattr(backfill, "_catch_up", catch_up)
    backfill.run_inline(run, ranges, progress=after_batch)

    run.refresh_from_db()
    version.refresh_from_db()
    assert (run.status, version.state) == (BackfillRun.Status.DONE, State.READY)
    # A column write gives the row a new version, the batch's transaction: recorded per batch.
    # A side-table write leaves the user's row as it is: nothing to record.
    assert all(bool(batch.write_xids) == (layout == "column") for batch in run.batches.all())
    assert set(read) == set(changed)
    assert assert_every_row_fresh(TARGET, "v1") == 30


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("layout", ["column"], indirect=True)  # write_xids: the column's filter
def test_catch_up_reads_the_rows_of_a_batch_without_recorded_writes(make_articles, monkeypatch):
    """A batch counted by code from before ``write_xids`` (NULL, during a rolling deploy) gives
    the catch-up pass nothing to skip: its rows are read; the other batches' are not."""
    articles, version = _version(make_articles, 30)
    call_command("embeddings", "backfill", TARGET, "v1", "--inline", "--batch-size", "10")
    run = version.runs.get()
    first_batch = run.batches.get(number=0)
    first_batch.write_xids = None
    first_batch.save(update_fields=["write_xids"])
    read = _rows_read(monkeypatch)
    backfill._catch_up(run, version, registry.get(TARGET))
    assert set(read) == set(sorted(a.pk for a in articles)[:10])


def _write_in_thread(field, prepared: sync.Prepared) -> tuple[threading.Thread, list]:
    """``write_prepared`` in a transaction of its own, on a thread with its own connection
    (started); its exception, if any, lands in the returned list."""
    errors: list[BaseException] = []

    def write() -> None:
        try:
            with transaction.atomic():
                sync.write_prepared(field, prepared)
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
        finally:
            connections.close_all()

    thread = threading.Thread(target=write)
    thread.start()
    return thread, errors


@pytest.mark.django_db(transaction=True)
def test_write_waiting_on_a_row_skips_it_when_the_writer_changes_its_text(make_articles):
    """The compare-and-set inside the UPDATE, under a real concurrent writer: another connection
    holds a row while the write runs, then changes its text and commits. The write, which was
    waiting for that row, finds a newer row version and leaves it (conflicted); the rest of the
    batch is written."""
    from tests.backfill_helpers import blocked_backends, raw_connection, wait_until

    articles, version = _version(make_articles, 5)
    field = registry.get(TARGET)
    ((page, _),) = list(sources.iter_source_pages(field, [version], field.source_queryset(), 10))
    prepared = sync.prepare(field, [version], page)
    held = sorted(a.pk for a in articles)[2]
    writer = raw_connection()
    try:
        writer.execute("UPDATE news_article SET category = category WHERE id = %s", [held])

        thread, errors = _write_in_thread(field, prepared)
        wait_until(lambda: blocked_backends(writer), timeout=30,
                   what="the write to wait for the row")
        writer.execute("UPDATE news_article SET title = 'Rewritten while the write waited' "
                       "WHERE id = %s", [held])
        writer.commit()
        thread.join(timeout=30)
    finally:
        writer.close()  # a failure must not leave the row locked (the teardown would wait)
    assert not thread.is_alive()
    assert not errors, errors
    _assert_written_all_but(held, prepared, version, articles)


@pytest.mark.django_db(transaction=True)
def test_a_write_of_two_versions_locks_all_its_rows_in_key_order_and_never_deadlocks(
        make_articles):
    """What deadlocked in the randomized test: a write of two versions, the first stale in the
    last row only, the second in the first and the last. Another connection holds the first
    row; the write waits for it. Then that connection locks the last row, as a writer locking
    in key order does. A write that locked each version's rows in its own statement held the
    last row by then (the first version's) and the two waited for each other until PostgreSQL
    aborted one. Locked all at once, in key order, the write holds nothing while it waits: the
    other connection gets the last row and commits, and the write goes on."""
    from tests.backfill_helpers import blocked_backends, raw_connection, wait_until

    articles, v1 = _version(make_articles, 2)
    first, last = sorted(a.pk for a in articles)
    call_command("embeddings", "add", TARGET, "v2", "--model", "tiny_other")
    v2 = EmbeddingVersion.objects.get(target=TARGET, version="v2")
    with transaction.atomic():
        lifecycle.transition(v2, State.BACKFILLING, note="test: being backfilled")
    field = registry.get(TARGET)
    sync.refresh_rows(field, [v1], [Article.objects.get(pk=first)])  # v1: stale in the last
    ((page, _),) = list(sources.iter_source_pages(field, [v1, v2], field.source_queryset(), 10))
    prepared = sync.prepare(field, [v1, v2], page)
    assert [[row[0] for row in item.rows] for item in prepared.pending] == [[last], [first, last]]
    other = raw_connection()
    try:
        other.execute("SET deadlock_timeout = '100ms'")  # a deadlock fails at once
        other.execute("SELECT id FROM news_article WHERE id = %s FOR UPDATE", [first])

        thread, errors = _write_in_thread(field, prepared)
        wait_until(lambda: blocked_backends(other), timeout=30,
                   what="the write to wait for the first row")
        other.execute("SELECT id FROM news_article WHERE id = %s FOR UPDATE", [last])
        other.commit()
        thread.join(timeout=30)
    finally:
        other.close()  # a failure must not leave the rows locked (the teardown would wait)
    assert not thread.is_alive()
    assert not errors, errors
    assert (prepared.stats.embedded, prepared.stats.conflicted) == (3, 0)
    stored = stores.stored_hashes(field, [v1, v2], [first, last])
    for obj in field.source_queryset():
        expected = field.source_hash(field.source_text(obj))
        assert stored[obj.pk] == (expected, expected)


@pytest.mark.django_db(transaction=True)
def test_two_versions_of_unchanged_rows_are_written_after_one_lock_without_a_reread(
        make_articles, monkeypatch, layout):
    """Rows read with their version and unchanged since: one statement locks them all, in key
    order; each version's write checks the row version the previous write of this transaction
    left; no source is read again; both versions end up fresh."""
    articles, v1 = _version(make_articles, 6)
    call_command("embeddings", "add", TARGET, "v2", "--model", "tiny_other")
    v2 = EmbeddingVersion.objects.get(target=TARGET, version="v2")
    with transaction.atomic():
        lifecycle.transition(v2, State.BACKFILLING, note="test: being backfilled")
    field = registry.get(TARGET)
    ((page, _),) = list(sources.iter_source_pages(field, [v1, v2], field.source_queryset(), 10))
    prepared = sync.prepare(field, [v1, v2], page)
    locked: list = []
    reread: list = []
    real_lock_rows, real_source_query = stores.lock_rows, sources.source_query

    def recording_lock_rows(field, pks):
        locked.append(sorted(pks))
        return real_lock_rows(field, pks)

    def recording_source_query(field, versions, queryset):
        reread.append(queryset)
        return real_source_query(field, versions, queryset)

    monkeypatch.setattr(stores, "lock_rows", recording_lock_rows)
    monkeypatch.setattr(sources, "source_query", recording_source_query)
    with transaction.atomic():
        write_xids = sync.write_prepared(field, prepared)
    assert locked == [sorted(a.pk for a in articles)]
    assert reread == []
    # Column: one transaction wrote them all (their new version). Table: the rows are unchanged.
    assert len(write_xids) == (1 if layout == "column" else 0)
    assert (prepared.stats.embedded, prepared.stats.conflicted) == (12, 0)
    stored = stores.stored_hashes(field, [v1, v2], [a.pk for a in articles])
    for obj in field.source_queryset():
        expected = field.source_hash(field.source_text(obj))
        assert stored[obj.pk] == (expected, expected)
