"""Chunked versions keep every guarantee of whole-row versions (issue 17, item 4), on the paths
tests/test_chunks.py does not take: a backfill and a "celery"-mode dual-write on a real Celery
worker, shadow reads answered by a worker with a chunked candidate (and of a whole-row candidate
while a chunked version serves), a gradual rollout between a whole-row and a chunked version,
derive and adopt, the admin's pages, and drop with its refusals. Real PostgreSQL + pgvector, the
tiny BERT (MiniLM's tokenizer); one worker process for the whole module."""

from __future__ import annotations

import html
import re
import uuid
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from django.core.management import CommandError, call_command
from django.db import connection, transaction

from embeddings_app import chunking, encoders, lifecycle, registry, search, shadow, stores
from embeddings_app.models import BackfillRun, EmbeddingVersion, ShadowBucket, State
from project.news.models import Article
from tests.backfill_helpers import WORKER_ENV, wait_until
from tests.conftest import TARGET
from tests.test_admin import (
    LIST_URL,
    OPERATOR_PERMS,
    STATUS_URL,
    admin_messages,
    change_url,
    login,
    make_user,
    step_url,
)
from tests.test_adopt import add_legacy_column, encode
from tests.test_chunks import CHUNK, brute_force, chunk_rows
from tests.test_shadow import expected_shadow
from tests.workers import WorkerProcess

pytestmark = pytest.mark.django_db(transaction=True)  # a worker reads what the tests commit

K = 5
OVERLAP = 4
QUERIES = ["economy and interest rates", "football transfer news", "mobile phone technology",
           "election campaign promises", "film awards ceremony", "oil prices rise"]


@pytest.fixture(scope="module")
def worker(django_db_setup: None) -> Iterator[WorkerProcess]:
    """One real worker for the module, on a queue of its own (``worker.queue``): a test that
    sends it tasks points ``EMBEDDINGS["QUEUE"]`` there."""
    queue = f"embeddings-chunks-{uuid.uuid4().hex[:8]}"
    process = WorkerProcess(concurrency=1, queue=queue, name="chunks", extra_env=WORKER_ENV)
    process.queue = queue  # type: ignore[attr-defined]
    yield process
    process.stop()


@pytest.fixture
def v1_whole_v2_chunked(make_articles: Callable[[int], list]) -> list[Article]:
    """16 real articles; v1 whole rows (tiny_other, another model) active, v2 chunked (tiny,
    chunks of 32 tokens overlapping by 4) ready; no index (exact searches)."""
    articles = make_articles(16)
    add_whole_v1_active_and_chunked_v2("--inline")
    return articles


def add_whole_v1_active_and_chunked_v2(*v2_backfill: str) -> None:
    """v1 whole rows (tiny_other) backfilled inline and active; v2 chunked (tiny, chunks of
    ``CHUNK`` tokens overlapping by ``OVERLAP``) added and backfilled with ``v2_backfill``'s
    options."""
    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny_other")
    call_command("embeddings", "backfill", TARGET, "v1", "--inline")
    call_command("embeddings", "activate", TARGET, "v1", "--force")
    call_command("embeddings", "add", TARGET, "v2", "--model", "tiny", "--chunks", str(CHUNK),
                 "--overlap", str(OVERLAP))
    call_command("embeddings", "backfill", TARGET, "v2", *v2_backfill)


def version(name: str) -> EmbeddingVersion:
    return EmbeddingVersion.objects.get_version(TARGET, name)


def whole_row_brute_force(record: EmbeddingVersion, query: np.ndarray, k: int) -> list[int]:
    """The k nearest rows of a whole-row version, in numpy over its stored vectors."""
    stored = {pk: vector for pk, (vector, _) in record.store.read_all().items()
              if vector is not None}
    keys = list(stored)
    matrix = np.stack([stored[pk] for pk in keys]).astype(np.float64)
    distances = 1 - matrix @ query / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(query))
    return [keys[i] for i in sorted(range(len(keys)), key=lambda i: (distances[i], keys[i]))[:k]]


# --- on a real worker -------------------------------------------------------------------------
@pytest.mark.worker
def test_a_chunked_version_backfills_on_the_worker_and_a_celery_mode_save_rewrites_only_its_changed_chunks(
        make_articles, worker, settings):
    settings.EMBEDDINGS = {**settings.EMBEDDINGS, "DUAL_WRITE": "celery", "QUEUE": worker.queue}
    articles = make_articles(10)
    add_whole_v1_active_and_chunked_v2("--batch-size", "4")  # v2's backfill on the worker
    v1, v2 = version("v1"), version("v2")
    run = BackfillRun.objects.get(version=v2)
    assert (v2.state, run.status, run.mode, run.batches_total) == ("ready", "done", "celery", 3)
    assert (run.rows_embedded, v2.store.coverage()) == (10, (10, 10))
    assert "embeddings_app.backfill_batch" in worker.log()
    field = Article.embedding
    encoder = encoders.for_version(v2)
    before = chunk_rows(v2)
    for article in articles:  # every row's chunks, exactly as cut here, with their vectors
        text = field.source_text(article)
        cuts = chunking.cut(v2, encoder, text)
        assert [(no, before[(article.pk, no)][:3]) for no in range(len(cuts))] == [
            (c.number, (field.source_hash(c.text), c.start, c.end)) for c in cuts]
        assert (article.pk, len(cuts)) not in before
    first = articles[0]
    cuts = chunking.cut(v2, encoder, field.source_text(first))
    np.testing.assert_allclose(v2.store.read_vector(first.pk),
                               encoder.encode_documents([c.text for c in cuts]), atol=2e-5)

    # A save sends its refresh task to a queue no worker serves yet: both versions stay stale,
    # the chunks untouched, and search of v2 still finds the row by its previous last chunk.
    held = f"{worker.queue}-held"
    settings.EMBEDDINGS = {**settings.EMBEDDINGS, "QUEUE": held}
    old_text = field.source_text(first)
    last = cuts[-1]
    edited = first.body.rstrip()
    first.body = edited[: len(edited) - 3] + "xyz"
    first.save()
    new_text = field.source_text(first)
    new_cuts = chunking.cut(v2, encoder, new_text)
    # The chunks whose number, text or offsets the edit changed (near the end of the row).
    rewritten = {c.number for c in new_cuts if c.number >= len(cuts) or (c.text, c.start, c.end)
                 != (cuts[c.number].text, cuts[c.number].start, cuts[c.number].end)}
    assert last.number in rewritten and len(rewritten) <= 3
    assert chunk_rows(v2) == before
    assert (lifecycle.readiness(v1).stale, lifecycle.readiness(v2).stale) == (1, 1)
    found = search._nearest(field, v2, encoder.encode_query(last.text), 1, None)[0]
    assert (found.pk, found.chunk.number) == (first.pk, last.number)
    assert found.chunk.text == new_text[last.start:last.end]  # offsets into the current text

    from project.celery import app

    replies = app.control.add_consumer(held, reply=True, limit=1, timeout=10)
    assert replies, "the worker did not answer add_consumer"
    wait_until(lambda: stores.stored_hashes(field, [v1, v2], [first.pk])[first.pk] == (
        field.source_hash(new_text),) * 2, timeout=60, what="the worker to refresh the row")
    assert "embeddings_app.refresh_rows" in worker.log()
    after = chunk_rows(v2)
    # Those chunks only were written (every other chunk row keeps its row version, xmin), and
    # the row has exactly its new chunks.
    assert {key for key in after if after[key] != before.get(key)} == {
        (first.pk, number) for number in rewritten}
    assert {no for pk, no in after if pk == first.pk} == set(range(len(new_cuts)))
    assert {key: row for key, row in after.items() if key[0] != first.pk} == {
        key: row for key, row in before.items() if key[0] != first.pk}
    for chunk in new_cuts:
        assert after[(first.pk, chunk.number)][:3] == (field.source_hash(chunk.text),
                                                       chunk.start, chunk.end)
    np.testing.assert_allclose(v2.store.read_vector(first.pk),
                               encoder.encode_documents([c.text for c in new_cuts]), atol=2e-5)
    assert old_text != new_text and lifecycle.readiness(v2).stale == 0


@pytest.mark.worker
def test_shadow_reads_of_a_chunked_candidate_rank_rows_by_their_best_chunk_and_the_other_way_round(
        v1_whole_v2_chunked, worker, settings):
    """v1 (whole rows) serves, v2 (chunked) is shadowed at rate 1: the worker's answers are the
    k best distinct rows by their best chunk, so the recorded overlap@k and rank correlation
    equal a recomputation by brute force over every stored chunk. Then v2 serves (results with
    ``.chunk``) and the standby v1 is shadowed: brute force over its whole-row vectors."""
    settings.EMBEDDINGS = {**settings.EMBEDDINGS, "QUEUE": worker.queue}
    v1, v2 = version("v1"), version("v2")
    shadow.start(TARGET, "v2", 1.0)
    served = {}
    for text in QUERIES:
        results = Article.embedding.search(text, k=K)
        assert {obj.embedding_version for obj in results} == {"v1"}
        assert not any(hasattr(obj, "chunk") for obj in results)
        served[text] = [str(obj.pk) for obj in results]
    assert shadow.flush()
    wait_until(lambda: shadow.summary(v2).queries == len(QUERIES), timeout=60,
               what=f"the worker recording {len(QUERIES)} shadow reads of v2")
    encoder2 = encoders.for_version(v2)
    overlap_sum, rank_sum, rank_queries = expected_shadow(served, lambda text: [
        pk for pk, _, _ in brute_force(v2, encoder2.encode_query(text), K)])
    bucket = ShadowBucket.objects.get(version=v2)
    assert bucket.overlap_sum == pytest.approx(overlap_sum, abs=1e-9)
    assert (bucket.rank_queries, bucket.unranked_rows) == (rank_queries, 0)
    assert bucket.rank_sum == pytest.approx(rank_sum, abs=1e-9)
    assert 0 < overlap_sum < len(QUERIES)  # two models: some rows in common, not all
    # A served row whose text changed behind the app's back has no fresh chunks: unranked.
    stale = Article.objects.order_by("pk").first()
    Article.objects.filter(pk=stale.pk).update(body="Rewritten behind the app's back.")
    field = registry.get(TARGET)
    assert shadow.unranked(field, v2, [str(stale.pk), served[QUERIES[0]][0]]) == [str(stale.pk)]
    Article.embedding.sync()

    # The other way round: the chunked version serves, the whole-row standby is shadowed.
    lifecycle.activate(TARGET, "v2", force=True)
    assert version("v2").shadow_rate == 0  # activate ended the shadow reads
    shadow.start(TARGET, "v1", 1.0)
    served = {}
    for text in QUERIES:
        results = Article.embedding.search(text, k=K)
        assert {obj.embedding_version for obj in results} == {"v2"}
        assert len({obj.pk for obj in results}) == K
        assert all(obj.chunk.text == Article.embedding.source_text(obj)[
            obj.chunk.start:obj.chunk.end] for obj in results)
        served[text] = [str(obj.pk) for obj in results]
    assert shadow.flush()
    wait_until(lambda: shadow.summary(v1).queries == len(QUERIES), timeout=60,
               what=f"the worker recording {len(QUERIES)} shadow reads of v1")
    encoder1 = encoders.for_version(v1)
    overlap_sum, rank_sum, rank_queries = expected_shadow(served, lambda text: (
        whole_row_brute_force(v1, encoder1.encode_query(text).astype(np.float64), K)))
    bucket = ShadowBucket.objects.get(version=v1)
    assert bucket.overlap_sum == pytest.approx(overlap_sum, abs=1e-9)
    assert (bucket.rank_queries, bucket.unranked_rows) == (rank_queries, 0)
    assert bucket.rank_sum == pytest.approx(rank_sum, abs=1e-9)


# --- in this process --------------------------------------------------------------------------
def test_a_rollout_between_a_whole_row_and_a_chunked_version_never_mixes_them_and_a_rollback_ends_it_at_once(
        v1_whole_v2_chunked, settings):
    """40% of 60 keys on the chunked v2 (24 expected; the buckets are CRC-32 of the keys, the
    same every run): each result list is one version's, v2's with ``.chunk`` and k distinct
    rows, each equal to that version's own search; sticky per key; rollback: v1 alone at once
    (ACTIVE_CACHE_TTL 0), v2 ready again."""
    settings.EMBEDDINGS = {**settings.EMBEDDINGS, "ACTIVE_CACHE_TTL": 0}
    call_command("embeddings", "activate", TARGET, "v2", "--percent", "40", "--force")
    field = Article.embedding
    served: dict[int, str] = {}
    for key in range(60):
        text = QUERIES[key % len(QUERIES)]
        results = field.search(text, k=K, key=f"user-{key}")
        versions = {obj.embedding_version for obj in results}
        assert len(versions) == 1, versions
        served[key] = versions.pop()
        if served[key] == "v2":
            assert len({obj.pk for obj in results}) == K
            assert all(obj.chunk.text == field.source_text(obj)[obj.chunk.start:obj.chunk.end]
                       for obj in results)
        else:
            assert not any(hasattr(obj, "chunk") for obj in results)
        if key % 10 == 0:  # sticky, and the same rows as that version's own search
            again = field.search(text, k=K, key=f"user-{key}")
            assert {obj.embedding_version for obj in again} == {served[key]}
            alone = field.search_vector(
                encoders.for_version(version(served[key])).encode_query(text),
                version=served[key], k=K)
            assert [obj.pk for obj in again] == [obj.pk for obj in alone]
            assert [getattr(obj, "chunk", None) for obj in again] == [
                getattr(obj, "chunk", None) for obj in alone]
    on_v2 = sum(1 for name in served.values() if name == "v2")
    assert 10 <= on_v2 <= 40, on_v2
    call_command("embeddings", "rollback", TARGET)
    for key in range(60):
        results = field.search(QUERIES[key % len(QUERIES)], k=K, key=f"user-{key}")
        assert {obj.embedding_version for obj in results} == {"v1"}
    v2 = version("v2")
    assert (v2.state, v2.rollout_percent) == ("ready", 0) and v2.deactivated_at is not None


def test_derive_from_a_chunked_parent_is_refused_and_adopt_with_a_chunked_alias_makes_a_whole_row_version(
        v1_whole_v2_chunked, settings, capsys):
    with pytest.raises(CommandError, match=r"^news\.Article\.embedding@v2 is chunked \(one vector "
                                           r"per chunk, not per row\); derive from a whole-row "
                                           r"version, or add a chunked version"):
        call_command("embeddings", "derive", TARGET, "v3", "--from", "v2", "--dimensions", "16")
    assert not EmbeddingVersion.objects.filter(version="v3").exists()

    # Existing vectors are one per row: adopted with an alias whose "chunks" chunks the versions
    # it adds, they become a whole-row version (said so), used in place, not re-encoded.
    models = settings.EMBEDDINGS["MODELS"]
    settings.EMBEDDINGS = {**settings.EMBEDDINGS, "MODELS": {
        **models, "tiny": {**models["tiny"], "chunks": CHUNK, "chunk_overlap": OVERLAP}}}
    articles = list(Article.objects.order_by("pk"))
    existing = encode("tiny", articles[:-2])
    add_legacy_column({a.pk: v for a, v in zip(articles, existing, strict=False)})
    capsys.readouterr()
    call_command("embeddings", "adopt", TARGET, "v3", "--model", "tiny", "--column", "legacy",
                 "--sample", "4", "--inline")
    out = capsys.readouterr().out
    assert "Adopted 14 vectors of column legacy of table news_article" in out
    assert ('Alias "tiny" chunks the versions it adds (chunks of 32 tokens), but these vectors '
            "are one per row: news.Article.embedding@v3 embeds whole rows.") in out
    v3 = version("v3")
    assert (v3.layout, v3.chunk_tokens, v3.state) == ("column", None, "ready")
    assert not isinstance(v3.store, stores.ChunkStore)
    stored = v3.store.read_all()
    for article, vector in zip(articles, existing, strict=False):
        np.testing.assert_array_equal(stored[article.pk][0], vector)
    assert v3.store.coverage() == (16, 16)  # the last two rows backfilled, whole
    # A version the same alias adds is chunked, by the alias's settings.
    call_command("embeddings", "add", TARGET, "v4", "--model", "tiny")
    assert (version("v4").chunk_tokens, version("v4").chunk_overlap) == (CHUNK, OVERLAP)


def test_the_admin_shows_a_chunked_version_and_drop_removes_both_its_tables_and_index_after_its_refusals(
        v1_whole_v2_chunked, capsys):
    call_command("embeddings", "index", TARGET, "v2")
    v2 = version("v2")
    assert f"Index {v2.store.index_name()} on table {v2.table} is valid" in capsys.readouterr().out
    tables = [v2.store.relation, v2.store.rows_relation]
    assert tables == [v2.table, f"{v2.table}__rows"]
    index = v2.store.index_name()
    assert v2.store.indexes() == [index]
    client = login(make_user("operator", staff=True, codenames=OPERATOR_PERMS))
    listing = html.unescape(client.get(LIST_URL).content.decode())
    assert f"chunks:{CHUNK}/{OVERLAP}" in listing and f"0% chunked:{CHUNK}" in listing
    detail = html.unescape(client.get(change_url(v2)).content.decode())
    assert "16 / 16 rows have a vector; 0 stale" in detail
    fields = dict(re.findall(r'<div class="[^"]*field-(chunk_tokens|chunk_overlap|layout|table)'
                             r'[^"]*">.*?<div class="readonly">(.*?)</div>', detail, re.S))
    assert fields == {"layout": "table", "table": v2.table, "chunk_tokens": str(CHUNK),
                      "chunk_overlap": str(OVERLAP)}
    status = client.get(STATUS_URL, {"id": v2.pk}).json()["versions"][str(v2.pk)]
    assert (status["index"], status["coverage_label"]) == ("valid", "16 / 16 (100.0%)")

    # Active: neither retired nor dropped. Rolled back from: standby, droppable only when
    # retired, and within the grace period only when confirmed.
    call_command("embeddings", "activate", TARGET, "v2", "--force")
    with pytest.raises(CommandError, match=r"v2 is active and cannot be retired"):
        call_command("embeddings", "retire", TARGET, "v2")
    with pytest.raises(CommandError, match=r"v2 is active and cannot be dropped"):
        call_command("embeddings", "drop", TARGET, "v2", "--yes")
    call_command("embeddings", "rollback", TARGET)
    with pytest.raises(CommandError, match=r"v2 is standby; only a retired version can be "
                                           r"dropped"):
        call_command("embeddings", "drop", TARGET, "v2", "--yes")
    call_command("embeddings", "retire", TARGET, "v2")
    with pytest.raises(CommandError, match=r"less than the grace period .* ago; confirm the drop"):
        call_command("embeddings", "drop", TARGET, "v2")
    assert set(tables) <= set(connection.introspection.table_names())
    page = client.get(step_url(v2, "drop")).content.decode()
    assert f"Drops tables {tables[0]} and {tables[1]} and index {index}" in html.unescape(page)
    shown = admin_messages(client, client.post(step_url(v2, "drop"),
                                               {"confirm": "yes", "yes": "on"}))
    assert shown == [f"{TARGET}@v2 dropped: tables {tables[0]} and {tables[1]} and index "
                     f"{index} removed."]
    assert not set(tables) & set(connection.introspection.table_names())
    assert version("v2").state == State.DROPPED
    with pytest.raises(CommandError, match=r"v2 is already dropped"):
        call_command("embeddings", "drop", TARGET, "v2", "--yes")
    # Saves and searches go on with v1 alone.
    article = Article.objects.order_by("pk").first()
    article.title = "A new headline about rugby"
    with transaction.atomic():
        article.save()
    assert {obj.embedding_version for obj in Article.embedding.search("rugby", k=3)} == {"v1"}
    detail = html.unescape(client.get(change_url(version("v2"))).content.decode())
    assert "not available (dropped" in detail
