"""Shadow reads and a gradual rollout (issue 16): a sampled share of live searches is answered by a
candidate version too, on a real Celery worker, and compared with what was served; activate,
rollback, retire and drop end it; the shadow gate holds activate back. A rollout serves a share
of the searches from the candidate, sticky per caller key, and a rollback ends it at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from celery.signals import before_task_publish
from django.core.management import CommandError, call_command
from django.db import connections
from scipy.stats import spearmanr

from embeddings_app import encoders, lifecycle, registry, rollout, shadow, tasks
from embeddings_app.config import get_config, validate
from embeddings_app.models import EmbeddingVersion, ShadowBucket
from project.news.models import Article
from tests.backfill_helpers import wait_until
from tests.conftest import TARGET
from tests.test_admin import OPERATOR_PERMS, admin_messages, login, make_user, step_url

pytestmark = pytest.mark.django_db(transaction=True)

K = 5
QUERIES = ["economy and interest rates", "football transfer news", "mobile phone technology",
           "election campaign promises", "film awards ceremony", "oil prices rise",
           "tennis champion wins", "music album release", "broadband internet users",
           "government tax plans"]


@pytest.fixture
def v1_active_v2_ready(make_articles: Callable[[int], list]) -> tuple[EmbeddingVersion, ...]:
    """40 real articles; v1 (tiny) active, v2 (tiny_other, another model) ready, no index."""
    make_articles(40)
    for name, alias in (("v1", "tiny"), ("v2", "tiny_other")):
        call_command("embeddings", "add", TARGET, name, "--model", alias)
        call_command("embeddings", "backfill", TARGET, name, "--inline")
    call_command("embeddings", "activate", TARGET, "v1", "--force")
    return tuple(EmbeddingVersion.objects.get_version(TARGET, n) for n in ("v1", "v2"))


@pytest.fixture
def published() -> Iterator[list[tuple]]:
    """The shadow reads this process sends, one item per sampled search (Celery's
    ``before_task_publish`` of the batches), and for each batch the name of the thread that
    published it (in ``publishers``)."""
    sent: list[tuple] = []
    publishers.clear()

    def count(sender: str | None = None, body: tuple | None = None, **_: object) -> None:
        if sender == "embeddings_app.shadow_reads":
            sent.extend(body[0][0])
            publishers.append(threading.current_thread().name)

    before_task_publish.connect(count, weak=False)
    yield sent
    before_task_publish.disconnect(count)


publishers: list[str] = []


def expected_shadow(served: dict[str, list[str]], rank: Callable[[str], list[Any]]
                    ) -> tuple[float, float, int]:
    """(overlap sum, rank correlation sum, queries with a correlation) recomputed here: the
    candidate's answer by ``rank`` (brute force), SciPy's Spearman over the rows both ranked."""
    overlap_sum, rank_sum, rank_queries = 0.0, 0.0, 0
    for text, served_keys in served.items():
        candidate = [str(pk) for pk in rank(text)]
        common = [key for key in served_keys if key in candidate]
        overlap_sum += len(common) / max(len(served_keys), len(candidate))
        if len(common) >= 2:
            rank_sum += spearmanr(range(len(common)),
                                  [candidate.index(key) for key in common]).statistic
            rank_queries += 1
    return overlap_sum, rank_sum, rank_queries


def recorded(version: EmbeddingVersion) -> int:
    return shadow.summary(version).queries


def test_live_searches_are_shadowed_on_a_worker_at_the_rate_and_recorded_as_recomputed(
        v1_active_v2_ready, celery_worker, published):
    """Rate 0.3 over 150 searches by 3 reader threads: 45 expected, binomial sd 5.6, accepted
    within 4 sd (23..67), each task sent recorded once by the worker. Then rate 1.0: every
    search shadowed, and the recorded sums equal a recomputation here: the candidate (no index:
    an exact scan) by brute force over its stored vectors, with SciPy's Spearman correlation."""
    _v1, v2 = v1_active_v2_ready
    celery_worker(concurrency=1)
    shadow.start(TARGET, "v2", 0.3)
    served_by: set[str] = set()
    problems: list[BaseException] = []

    def reader(offset: int) -> None:
        try:
            for i in range(50):
                for obj in Article.embedding.search(QUERIES[(i + offset) % len(QUERIES)], k=K):
                    served_by.add(obj.embedding_version)
        except BaseException as exc:  # reported below
            problems.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not problems, problems
    assert served_by == {"v1"}  # the candidate never serves
    assert shadow.flush()
    assert 23 <= len(published) <= 67, len(published)
    # The readers only queued their samples: the process's publisher thread sent every task.
    assert set(publishers) == {"embeddings-shadow-publisher"}
    wait_until(lambda: recorded(v2) == len(published), timeout=90,
               what=f"the worker recording {len(published)} shadow reads")
    sampled = shadow.summary(v2)
    assert sampled.unranked_rows == 0 and sampled.candidate_seconds > 0

    ShadowBucket.objects.all().delete()
    published.clear()
    shadow.start(TARGET, "v2", 1.0)
    served = {text: [str(obj.pk) for obj in Article.embedding.search(text, k=K)]
              for text in QUERIES}
    assert shadow.flush()
    assert len(published) == len(QUERIES)
    wait_until(lambda: recorded(v2) == len(QUERIES), timeout=90, what="10 shadow reads recorded")

    stored = v2.store.read_all()
    keys = [str(pk) for pk in stored]
    matrix = np.stack([stored[pk][0] for pk in stored]).astype(np.float64)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    encoder = encoders.for_version(v2)

    def brute_force(text: str) -> list[str]:
        query = encoder.encode_query(text).astype(np.float64)
        order = np.argsort(-(matrix @ (query / np.linalg.norm(query))), kind="stable")[:K]
        return [keys[i] for i in order]

    overlap_sum, rank_sum, rank_queries = expected_shadow(served, brute_force)
    bucket = ShadowBucket.objects.get(version=v2)
    assert bucket.queries == len(QUERIES)
    assert bucket.overlap_sum == pytest.approx(overlap_sum, abs=1e-9)
    assert bucket.rank_queries == rank_queries
    assert bucket.rank_sum == pytest.approx(rank_sum, abs=1e-9)
    # No query text is kept anywhere in the records.
    assert not any(text in repr(list(ShadowBucket.objects.values())) for text in QUERIES)

    # A single shadow read as an earlier release published it (a rolling deploy) is still
    # recorded by the worker.
    text = QUERIES[0]
    tasks.shadow_read.apply_async((v2.pk, text, K, served[text], 0.01), queue=get_config().queue)
    wait_until(lambda: recorded(v2) == len(QUERIES) + 1, timeout=90,
               what="the single shadow read recorded")


def test_a_served_row_without_a_fresh_candidate_vector_counts_as_unranked(v1_active_v2_ready):
    _v1, v2 = v1_active_v2_ready
    field = registry.get(TARGET)
    first, second = Article.objects.order_by("pk")[:2]
    Article.objects.filter(pk=first.pk).update(body="Rewritten behind the app's back.")
    assert shadow.unranked(field, v2, [str(first.pk), str(second.pk)]) == [str(first.pk)]


def test_activate_and_rollback_end_shadow_reads_and_late_tasks_record_nothing(
        v1_active_v2_ready, published):
    _v1, v2 = v1_active_v2_ready
    shadow.start(TARGET, "v2", 1.0)
    Article.embedding.search(QUERIES[0], k=K)
    assert shadow.flush()
    assert len(published) == 1
    lifecycle.activate(TARGET, "v2", force=True)
    assert EmbeddingVersion.objects.get(pk=v2.pk).shadow_rate == 0
    for text in QUERIES:
        Article.embedding.search(text, k=K)
    assert shadow.flush()
    assert len(published) == 1  # none after the flip
    # A task sent before the flip and delivered after it records nothing.
    assert shadow.record(v2.pk, QUERIES[0], K, [], 0.01) is None
    # The standby v1 shadowed, then a rollback: off again.
    shadow.start(TARGET, "v1", 0.5)
    lifecycle.rollback(TARGET)
    assert set(EmbeddingVersion.objects.values_list("shadow_rate", flat=True)) == {0.0}
    assert ShadowBucket.objects.count() == 0


def test_shadowing_refuses_versions_that_are_not_complete_and_rates_out_of_range(
        v1_active_v2_ready):
    with pytest.raises(CommandError, match=r"v1 is active; only a ready or standby version"):
        call_command("embeddings", "shadow", TARGET, "v1", "--rate", "0.1")
    for rate in ("0", "1.5", "nan"):
        with pytest.raises(CommandError, match=r"shadow rate must be a share of searches in "
                                               r"\(0, 1\].*\[--rate\]$"):
            call_command("embeddings", "shadow", TARGET, "v2", "--rate", rate)
    assert set(EmbeddingVersion.objects.values_list("shadow_rate", flat=True)) == {0.0}
    problems = {p.id for p in validate({"MODELS": {}, "SHADOW_MIN_QUERIES": -1,
                                        "SHADOW_MIN_OVERLAP": 1.5})}
    assert {"embeddings.E080", "embeddings.E081"} <= problems


def test_the_shadow_gate_refuses_activate_below_its_figures_from_command_and_admin(
        v1_active_v2_ready, settings, capsys):
    _v1, v2 = v1_active_v2_ready
    call_command("embeddings", "index", TARGET, "v2")
    call_command("embeddings", "verify", TARGET, "v2")
    settings.EMBEDDINGS = {**settings.EMBEDDINGS, "SHADOW_MIN_QUERIES": 3}
    with pytest.raises(CommandError, match=r"v2 has 0 shadow queries, fewer than "
                                           r'EMBEDDINGS\["SHADOW_MIN_QUERIES"\] = 3'):
        call_command("embeddings", "activate", TARGET, "v2")
    client = login(make_user("operator", staff=True, codenames=OPERATOR_PERMS))
    shown = admin_messages(client, client.post(step_url(v2, "activate"), {"confirm": "yes"}))
    assert "v2 has 0 shadow queries" in shown[0]
    shadow.start(TARGET, "v2", 1.0)
    for text in QUERIES[:3]:  # what the worker does, in this process
        served = [str(obj.pk) for obj in Article.embedding.search(text, k=K)]
        assert shadow.record(v2.pk, text, K, served, 0.01) is not None
    call_command("embeddings", "status", TARGET)
    assert "shadow reads of news.Article.embedding@v2: shadow at 100%, 3 queries" in (
        capsys.readouterr().out)
    mean = shadow.summary(v2).mean_overlap
    settings.EMBEDDINGS = {**settings.EMBEDDINGS, "SHADOW_MIN_OVERLAP": min(mean + 0.01, 1.0)}
    with pytest.raises(CommandError, match=rf"mean shadow overlap@k is {mean:.3f} over 3 "
                                           r"queries, below"):
        call_command("embeddings", "activate", TARGET, "v2")
    settings.EMBEDDINGS = {**settings.EMBEDDINGS, "SHADOW_MIN_OVERLAP": 0.0}
    call_command("embeddings", "activate", TARGET, "v2")
    assert EmbeddingVersion.objects.get(pk=v2.pk).state == "active"


# --- gradual rollout (issue 16, build 3) ------------------------------------------------------
def test_a_rollout_serves_its_share_sticky_per_key_and_never_mixes_versions(
        v1_active_v2_ready, settings):
    """30% over 200 keys: 60 expected, binomial sd 6.5, accepted within 4 sd (34..86); each key
    answered by one version every time, each result list entirely that version's, equal to a
    search of that version alone."""
    settings.EMBEDDINGS = {**settings.EMBEDDINGS, "ACTIVE_CACHE_TTL": 0}
    v1, v2 = v1_active_v2_ready
    with pytest.raises(CommandError, match=r"v1 is already active"):
        call_command("embeddings", "activate", TARGET, "v1", "--percent", "30")
    with pytest.raises(CommandError, match=r"^The share of searches in percent must be an "
                                           r"integer from 1 to 100, not 0\. \[--percent\]$"):
        call_command("embeddings", "activate", TARGET, "v2", "--percent", "0")
    call_command("embeddings", "activate", TARGET, "v2", "--percent", "30", "--force")
    assert EmbeddingVersion.objects.get(pk=v2.pk).rollout_percent == 30
    served = {}
    for key in range(200):
        results = Article.embedding.search(QUERIES[key % len(QUERIES)], k=K, key=f"user-{key}")
        versions = {obj.embedding_version for obj in results}
        assert len(versions) == 1, versions
        served[key] = versions.pop()
    on_v2 = sum(1 for version in served.values() if version == "v2")
    assert 34 <= on_v2 <= 86, on_v2
    for key in range(0, 200, 20):  # sticky, and the same rows as that version's own search
        text = QUERIES[key % len(QUERIES)]
        again = Article.embedding.search(text, k=K, key=f"user-{key}")
        assert {obj.embedding_version for obj in again} == {served[key]}
        version = v2 if served[key] == "v2" else v1
        alone = Article.embedding.search_vector(
            encoders.for_version(version).encode_query(text), version=version.version, k=K)
        assert [obj.pk for obj in again] == [obj.pk for obj in alone]
    rollout.flush()
    call_command("embeddings", "status", TARGET)


def test_a_rollback_during_a_rollout_serves_the_active_version_alone_after_the_switch_bound(
        v1_active_v2_ready, capsys):
    """Reader threads keep searching with random keys through the rollback; after the switch
    bound (ACTIVE_CACHE_TTL, 1 s) no read is answered by v2."""
    _v1, v2 = v1_active_v2_ready
    lifecycle.activate(TARGET, "v2", percent=50, force=True)
    log: list[tuple[float, str]] = []
    stop = threading.Event()
    problems: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                results = Article.embedding.search("interest rates", k=K)
                log.append((time.monotonic(), results[0].embedding_version))
        except BaseException as exc:  # reported below
            problems.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    wait_until(lambda: {"v1", "v2"} <= {version for _, version in log}, timeout=60,
               what="reads served by both versions")
    call_command("embeddings", "rollback", TARGET)
    rolled_back = time.monotonic()
    time.sleep(2.5)
    stop.set()
    for thread in threads:
        thread.join(30)
    assert not problems, problems
    after_bound = [version for at, version in log if at > rolled_back + 1.0 + 0.2]
    assert after_bound and set(after_bound) == {"v1"}
    record = EmbeddingVersion.objects.get(pk=v2.pk)
    assert record.rollout_percent == 0 and record.state == "ready"
    assert record.deactivated_at is not None  # drop's grace period applies to it
    rollout.flush()
    call_command("embeddings", "status", TARGET)
    out = capsys.readouterr().out
    assert "reads in the last 24 h: v1 " in out and ", v2 " in out
