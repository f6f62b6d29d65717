"""Lifecycle steps of one target are serialized and re-check their preconditions under the lock
(issue 12, build 1): the races an operator found are reproduced here with real sessions."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connections

from embeddings_app import lifecycle, stores
from embeddings_app.exceptions import Refused
from embeddings_app.models import EmbeddingVersion, State
from project.news.models import Article
from tests.backfill_helpers import raw_connection, wait_until
from tests.conftest import TARGET

pytestmark = pytest.mark.django_db(transaction=True)


class Step(threading.Thread):
    """A lifecycle call in a thread of its own (its own database session); ``result`` is its
    return value or the exception it raised."""

    def __init__(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self.call = (func, args, kwargs)
        self.result: Any = None

    def run(self) -> None:
        func, args, kwargs = self.call
        try:
            self.result = func(*args, **kwargs)
        except BaseException as exc:  # inspected by the test
            self.result = exc
        finally:
            connections.close_all()

    def outcome(self, timeout: float = 120) -> Any:
        self.join(timeout)
        assert not self.is_alive(), "the step did not finish"
        return self.result


def lock_waiters() -> int:
    """Sessions of this database waiting for a lock (a table lock or the lifecycle lock)."""
    with raw_connection() as probe:
        probe.autocommit = True
        return probe.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'").fetchone()[0]


def columns() -> set[str]:
    return stores.existing_columns("news_article")


@pytest.fixture
def v1_ready_v2_active(make_articles: Callable) -> None:
    make_articles(20)
    for name, alias in (("v1", "tiny"), ("v2", "tiny_other")):
        call_command("embeddings", "add", TARGET, name, "--model", alias)
        call_command("embeddings", "backfill", TARGET, name, "--inline")
    call_command("embeddings", "activate", TARGET, "v2", "--force")


def test_a_forced_activate_racing_retire_and_drop_is_refused_and_reads_keep_working(
        v1_ready_v2_active):
    """The issue's outage: `activate v1 --force` inside its readiness scan (held by another
    session's ACCESS EXCLUSIVE lock on the table), then `retire v1` and `drop v1 --yes`."""
    locker = raw_connection()
    locker.execute("LOCK TABLE news_article IN ACCESS EXCLUSIVE MODE")
    activate = Step(lifecycle.activate, TARGET, "v1", force=True)
    activate.start()
    wait_until(lambda: lock_waiters() >= 1, what="activate blocked in its readiness scan")
    lifecycle.retire(TARGET, "v1")  # does not wait for the scan
    drop = Step(lifecycle.drop, TARGET, "v1", yes=True)
    drop.start()
    # drop commits "dropped" first, then waits for the table to remove the columns.
    wait_until(lambda: EmbeddingVersion.objects.get(target=TARGET, version="v1").state
               == State.DROPPED, what="v1 dropped")
    locker.rollback()
    locker.close()

    refusal = activate.outcome()
    assert isinstance(refusal, Refused), refusal
    assert "v1 is dropped" in str(refusal) or "v1 is retired" in str(refusal)
    assert isinstance(drop.outcome(), list)
    states = dict(EmbeddingVersion.objects.for_target(TARGET).values_list("version", "state"))
    assert states == {"v1": State.DROPPED, "v2": State.ACTIVE}
    assert "embedding_v1" not in columns() and "embedding_v2" in columns()
    # Reads, saves and status work.
    assert len(Article.embedding.search("the economy", k=5)) == 5
    article = Article.objects.first()
    article.title = "A saved title"
    article.save()
    assert article.embedding.vector("v2") is not None
    call_command("embeddings", "status", TARGET)


def test_an_activate_racing_retire_never_serves_a_retired_version(v1_ready_v2_active):
    """Without --force and without drop: the same window gave `retired -> active`."""
    call_command("embeddings", "verify", TARGET, "v1")
    locker = raw_connection()
    locker.execute("LOCK TABLE news_article IN ACCESS EXCLUSIVE MODE")
    activate = Step(lifecycle.activate, TARGET, "v1", force=True)
    activate.start()
    wait_until(lambda: lock_waiters() >= 1, what="activate blocked in its readiness scan")
    lifecycle.retire(TARGET, "v1")
    locker.rollback()
    locker.close()
    refusal = activate.outcome()
    assert isinstance(refusal, Refused) and "v1 is retired" in str(refusal), refusal
    assert EmbeddingVersion.objects.get(target=TARGET, state=State.ACTIVE).version == "v2"


def test_two_concurrent_adds_of_one_name_give_one_version_and_one_clear_refusal(
        v1_ready_v2_active):
    locker = raw_connection()
    locker.execute("LOCK TABLE news_article IN ACCESS EXCLUSIVE MODE")
    adds = [Step(lifecycle.add, TARGET, "v3", "tiny") for _ in range(2)]
    for step in adds:
        step.start()
    # One waits for the table (its column check), the other for the lifecycle lock.
    wait_until(lambda: lock_waiters() >= 2, what="both adds waiting")
    locker.rollback()
    locker.close()
    outcomes = [step.outcome() for step in adds]
    added = [o for o in outcomes if isinstance(o, EmbeddingVersion)]
    refused = [o for o in outcomes if isinstance(o, Refused)]
    assert len(added) == 1 and len(refused) == 1, outcomes
    assert str(refused[0]) == (f'{TARGET} already has a version "v3" (names are never reused, '
                               "even after drop); choose another name.")
    assert EmbeddingVersion.objects.filter(target=TARGET, version="v3").count() == 1
    assert "embedding_v3" in columns()


def test_a_drop_interrupted_after_its_state_change_is_finished_by_a_second_drop(
        v1_ready_v2_active):
    lifecycle.retire(TARGET, "v1")
    with lifecycle.locked_versions(TARGET) as versions:  # as if drop died before its DDL
        v1 = next(v for v in versions.values() if v.version == "v1")
        lifecycle.transition(v1, State.DROPPED, note="drop")
    assert "embedding_v1" in columns()
    # Nothing reads or writes it meanwhile: a save and a search work.
    article = Article.objects.first()
    article.body = "Changed while v1 is half dropped."
    article.save()
    assert len(Article.embedding.search("sport", k=3)) == 3
    lifecycle.drop(TARGET, "v1", yes=True)
    assert "embedding_v1" not in columns() and "embedding_v1_source_hash" not in columns()
    with pytest.raises(Refused, match="already dropped"):
        lifecycle.drop(TARGET, "v1", yes=True)


class IndexBuild(threading.Thread):
    """``CREATE INDEX CONCURRENTLY`` on the article table in a session of its own, held in its
    first wait (for the table's writers) until ``writer`` (another session's uncommitted
    UPDATE of one article) ends. Its last wait is for every transaction with a snapshot older
    than the index's: a session that queued for the table meanwhile holding one is such a
    transaction."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.writer = raw_connection()
        self.writer.execute("UPDATE news_article SET title = title "
                            "WHERE id = (SELECT min(id) FROM news_article)")
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with raw_connection() as build:
                build.autocommit = True
                build.execute("CREATE INDEX CONCURRENTLY news_article_title_cic "
                              "ON news_article (title)")
        except BaseException as exc:  # inspected by the test
            self.error = exc

    def building(self) -> bool:
        with raw_connection() as probe:
            probe.autocommit = True
            return bool(probe.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'CREATE INDEX "
                "CONCURRENTLY news_article_title_cic%%' AND wait_event_type = 'Lock'"
            ).fetchone()[0])

    def finish(self) -> None:
        self.writer.rollback()
        self.writer.close()
        self.join(60)
        assert not self.is_alive(), "the index build did not finish"


@pytest.mark.parametrize("layout", ["column", "table"])
def test_an_add_during_a_concurrent_index_build_waits_for_it_and_neither_deadlocks(
        v1_ready_v2_active, layout):
    """The CI run's deadlock: `add` queued for the table lock of its DDL while an index build on
    the table held it, and the build then waited for `add`'s snapshot. `add` takes its locks
    without queueing (stores.lock_for_ddl), so both finish."""
    build = IndexBuild()
    build.start()
    try:
        wait_until(build.building, what="the index build waiting for the writer")
        add = Step(lifecycle.add, TARGET, "v3", "tiny", layout=layout)
        add.start()
        add.join(1.5)  # polling for the table's lock meanwhile
        assert add.is_alive()
    finally:
        build.finish()
    version = add.outcome()
    assert isinstance(version, EmbeddingVersion), version
    assert build.error is None, build.error
    assert version.store.exists()
    with raw_connection() as probe:
        assert probe.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = "
                             "'news_article_title_cic'::regclass").fetchone() == (True,)
        probe.execute("DROP INDEX news_article_title_cic")
        probe.commit()


def test_an_add_refuses_when_the_table_stays_locked_and_changes_nothing(v1_ready_v2_active):
    build = IndexBuild()
    build.start()
    try:
        wait_until(build.building, what="the index build waiting for the writer")
        with pytest.raises(Refused) as refusal:
            lifecycle.add(TARGET, "v3", "tiny")
    finally:
        build.finish()
    assert str(refusal.value).startswith(
        f"Table news_article stayed locked by other sessions for {stores.DDL_LOCK_SECONDS:g}s (pid ")
    assert "ShareUpdateExclusiveLock (CREATE INDEX CONCURRENTLY news_article_title_cic" in str(
        refusal.value)
    assert str(refusal.value).endswith("nothing was changed: retry when it ends.")
    assert not EmbeddingVersion.objects.filter(target=TARGET, version="v3").exists()
    assert "embedding_v3" not in columns()
    with raw_connection() as probe:
        probe.execute("DROP INDEX news_article_title_cic")
        probe.commit()
