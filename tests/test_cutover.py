"""Zero-downtime flip (issue 4, acceptance 1) and the activate / rollback / drop rules."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test import override_settings

from embeddings_app import encoders, lifecycle
from embeddings_app.exceptions import Refused, VersionNotReady
from embeddings_app.models import EmbeddingVersion, State, VersionEvent
from project.news.models import Article
from tests.conftest import TARGET
from tests.workers import ROOT, database_url

pytestmark = pytest.mark.usefixtures("layout")  # both layouts

TTL = 0.5  # EMBEDDINGS["ACTIVE_CACHE_TTL"] of the reading process in this test
QUERIES = ["stock market shares", "football cup final", "mobile phone networks",
           "general election", "film award ceremony", "oil prices", "music album chart"]
K = 10


def prepare(version: str, alias: str) -> None:
    call_command("embeddings", "add", TARGET, version, "--model", alias)
    call_command("embeddings", "backfill", TARGET, version, "--inline")
    call_command("embeddings", "index", TARGET, version, "--ef-search", "100")
    call_command("embeddings", "verify", TARGET, version)


def brute_force(version: EmbeddingVersion, query_vector: np.ndarray) -> list[int]:
    """The exact top K of ``version``'s stored vectors, computed in numpy."""
    rows = list(Article.objects.order_by("pk"))
    stored = np.vstack([version.store.read_vector(row.pk) for row in rows])
    stored /= np.linalg.norm(stored, axis=1, keepdims=True)
    similarity = stored @ (query_vector / np.linalg.norm(query_vector))
    order = np.lexsort((np.array([row.pk for row in rows]), -np.round(similarity, 6)))
    return [rows[i].pk for i in order[:K]]


def flip_in_another_process(*args: str) -> None:
    """Run `manage.py embeddings ...` as a separate process (another server's deploy step)."""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings",
           "DATABASE_URL": database_url(), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "manage.py", "embeddings", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.django_db(transaction=True)
def test_readers_never_fail_never_mix_and_switch_within_the_ttl(make_articles):
    make_articles(60)
    prepare("v1", "tiny")
    prepare("v2", "tiny_other")
    call_command("embeddings", "activate", TARGET, "v1")
    versions = {v.version: v for v in EmbeddingVersion.objects.for_target(TARGET)}
    expected = {}  # (version, query) -> the exact ranking of that version
    for name, version in versions.items():
        encoder = encoders.for_version(version)
        for query in QUERIES:
            expected[name, query] = brute_force(version, encoder.encode_query(query))
    assert expected["v1", QUERIES[0]] != expected["v2", QUERIES[0]]  # the check can tell them apart

    reads: list[tuple[int, float, str, str, list[int]]] = []  # reader, start, version, query, pks
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader(number: int) -> None:
        try:
            i = number
            while not stop.is_set():
                query = QUERIES[i % len(QUERIES)]
                i += 1
                started = time.time()
                results = Article.embedding.search(query, k=K)
                claimed = {obj.embedding_version for obj in results}
                assert len(claimed) == 1, claimed
                reads.append((number, started, claimed.pop(), query, [o.pk for o in results]))
        except BaseException as exc:  # every failure of a read is reported
            errors.append(exc)
        finally:
            connection.close()

    embeddings = {**settings.EMBEDDINGS, "ACTIVE_CACHE_TTL": TTL}
    with override_settings(EMBEDDINGS=embeddings):
        threads = [threading.Thread(target=reader, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        try:
            flips = []
            for args, new in ((("activate", TARGET, "v2"), "v2"), (("rollback", TARGET), "v1")):
                time.sleep(1.0)
                before = time.time()
                flip_in_another_process(*args)
                flips.append((before, time.time(), new))
            time.sleep(TTL + 1.0)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
    assert not errors, errors
    assert len(reads) > 100

    for _, _, version, query, pks in reads:  # never a mixed or cross-version result
        assert pks == expected[version, query], (version, query)

    events = list(VersionEvent.objects.filter(to_state=State.ACTIVE).order_by("at"))[-2:]
    lags = []
    for (before, after, new), event in zip(flips, events, strict=True):
        committed = event.at.timestamp()
        assert before <= committed <= after
        old = "v1" if new == "v2" else "v2"
        window_end = min((b for b, _, _ in flips if b > before), default=float("inf"))
        for reader_no in range(4):
            mine = [r for r in reads if r[0] == reader_no and before <= r[1] < window_end]
            assert any(r[2] == new for r in mine), f"reader {reader_no} never switched to {new}"
            stale = [r[1] for r in mine if r[2] == old]
            lags.append(max(stale, default=committed) - committed)
            # The documented bound: a search starting TTL after the commit uses the new version.
            late = [r for r in mine if r[1] > after + TTL and r[2] != new]
            assert not late, f"reader {reader_no} still read {old} {late[0][1] - committed:.2f}s after"
    print(f"\n{len(reads)} reads; max switch lag after commit {max(lags):.3f}s (TTL {TTL}s)")
    assert max(lags) <= (max(after - before for before, after, _ in flips) + TTL)


@pytest.mark.django_db(transaction=True)
def test_activate_refuses_unless_complete_fresh_verified_and_indexed(make_articles, capsys):
    articles = make_articles(20)
    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny")
    call_command("embeddings", "backfill", TARGET, "v1", "--inline")

    def refused() -> str:
        with pytest.raises(CommandError) as failure:
            call_command("embeddings", "activate", TARGET, "v1")
        return str(failure.value)

    message = refused()
    assert "has no passing verify; run `manage.py embeddings verify" in message
    call_command("embeddings", "verify", TARGET, "v1")
    assert "has no valid HNSW index; run `manage.py embeddings index" in refused()
    call_command("embeddings", "index", TARGET, "v1")
    Article.objects.filter(pk=articles[0].pk).update(body="changed behind the app's back")
    assert "is not complete and fresh (1 rows are stale)" in refused()
    Article.embedding.sync()
    EmbeddingVersion.objects.filter(target=TARGET, version="v1").update(verify_passed=False)
    assert "has no passing verify (the last one failed)" in refused()
    with override_settings(EMBEDDINGS={**settings.EMBEDDINGS, "VERIFY_MAX_AGE": 0}):
        call_command("embeddings", "verify", TARGET, "v1")
        assert "last verify is older than 0:00:00" in refused()
    assert EmbeddingVersion.objects.get(target=TARGET, version="v1").state == State.READY

    call_command("embeddings", "activate", TARGET, "v1")
    assert EmbeddingVersion.objects.get(target=TARGET, version="v1").state == State.ACTIVE


@pytest.mark.django_db(transaction=True)
def test_force_activates_with_a_warning(make_articles, capsys):
    make_articles(10)
    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny")
    call_command("embeddings", "backfill", TARGET, "v1", "--inline")
    call_command("embeddings", "activate", TARGET, "v1", "--force")
    err = capsys.readouterr().err
    assert "Activating anyway (forced), although news.Article.embedding@v1 has no passing verify" in err
    assert "Activating anyway (forced), although news.Article.embedding@v1 has no valid HNSW" in err
    assert Article.embedding.active().version == "v1"


@pytest.mark.django_db(transaction=True)
def test_standby_is_dual_written_rollback_flips_back_and_drop_waits_for_the_grace_period(
        make_articles):
    articles = make_articles(15)
    prepare("v1", "tiny")
    call_command("embeddings", "activate", TARGET, "v1")
    prepare("v2", "tiny_other")
    call_command("embeddings", "activate", TARGET, "v2")
    assert EmbeddingVersion.objects.get(target=TARGET, version="v1").state == State.STANDBY

    article = articles[2]
    article.title = "Standby versions are still written"
    article.save()
    fresh = encoders.load(settings_model("tiny")).encode_documents([article.embedding.text])[0]
    stored = article.embedding.vector(version="v1")
    assert float(stored @ fresh / np.linalg.norm(stored) / np.linalg.norm(fresh)) > 0.9999

    call_command("embeddings", "rollback", TARGET)
    assert Article.embedding.search("anything", k=1)[0].embedding_version == "v1"
    v2 = EmbeddingVersion.objects.get(target=TARGET, version="v2")
    assert v2.state == State.STANDBY

    call_command("embeddings", "retire", TARGET, "v2")
    with pytest.raises(CommandError, match=r"was active until .* less than the grace period "
                                           r"\(1 day, 0:00:00\) ago; confirm the drop to drop it "
                                           r"anyway\. \[--yes\]$"):
        call_command("embeddings", "drop", TARGET, "v2")
    with pytest.raises(Refused, match=r"confirm the drop to drop it anyway\.$") as refused:
        lifecycle.drop(TARGET, "v2")  # the library's line names no flag; its option is `yes`
    assert refused.value.option == "yes"
    with pytest.raises(VersionNotReady):
        lifecycle.activate(TARGET, "v2")  # retired: never activated again
    with override_settings(EMBEDDINGS={**settings.EMBEDDINGS, "DROP_GRACE_PERIOD": 0}):
        lifecycle.check_droppable(EmbeddingVersion.objects.get(pk=v2.pk))  # grace over: allowed
    call_command("embeddings", "drop", TARGET, "v2", "--yes")
    assert EmbeddingVersion.objects.get(pk=v2.pk).state == State.DROPPED


def settings_model(alias: str):
    from embeddings_app.config import get_config

    return get_config().model(alias)
