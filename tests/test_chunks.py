"""Chunked versions (embeddings_app.chunking): text cut with the model's own tokenizer, one vector
per chunk in a side table, only changed chunks re-embedded, search over chunks returning the k
best distinct rows with their best chunk, and the lifecycle between a whole-row and a chunked
version. Real PostgreSQL + pgvector, the tiny BERT (MiniLM's tokenizer) and the real MiniLM."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, transaction

from embeddings_app import capture, chunking, encoders, lifecycle, search, stores, sync
from embeddings_app.config import get_config
from embeddings_app.models import EmbeddingVersion, State
from project.news.corpus import iter_articles
from project.news.models import Article
from tests.conftest import TARGET

CHUNK = 32  # tokens: a BBC article is then about 10 to 30 chunks


def chunk_rows(version: EmbeddingVersion) -> dict[tuple[int, int], tuple[bytes, int, int, str]]:
    """(row, chunk_no) -> (chunk hash, start, end, the chunk row's xmin)."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT id, chunk_no, chunk_hash, start_char, end_char, xmin::text "
                       f"FROM {stores.qn(version.table)}")
        return {(pk, no): (bytes(digest), start, end, xmin)
                for pk, no, digest, start, end, xmin in cursor.fetchall()}


def brute_force(version: EmbeddingVersion, query: np.ndarray, k: int,
                keys: set[int] | None = None) -> list[tuple[int, float, int]]:
    """The k best rows by their best chunk, computed in numpy over every stored chunk:
    (row, distance, chunk number)."""
    best: dict[int, tuple[float, int]] = {}
    for pk, (vectors, _) in version.store.read_all().items():
        if vectors is None or (keys is not None and pk not in keys):
            continue
        distances = 1 - vectors @ query / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(query))
        best[pk] = (float(distances.min()), int(distances.argmin()))
    ranked = sorted(best.items(), key=lambda item: (item[1][0], item[0]))[:k]
    return [(pk, distance, number) for pk, (distance, number) in ranked]


def test_chunks_are_cut_with_the_models_tokenizer_within_the_size_and_on_sentence_ends():
    text = next(iter_articles(1)).body
    encoder = encoders.load(get_config().model("tiny"))
    tokenizer = encoder.model.tokenizer
    version = EmbeddingVersion(chunk_tokens=CHUNK, chunk_overlap=0)
    chunks = chunking.cut(version, encoder, text)
    assert len(chunks) > 5
    for chunk in chunks:
        assert chunk.text == text[chunk.start:chunk.end] and chunk.text.strip() == chunk.text
        assert len(tokenizer(chunk.text, add_special_tokens=False)["input_ids"]) <= CHUNK
    # In order, covering the text: only whitespace between neighbours.
    for before, after in pairwise(chunks):
        assert before.end <= after.start and not text[before.end:after.start].strip()
    assert not text[:chunks[0].start].strip() and not text[chunks[-1].end:].strip()
    ends = sum(chunk.text.endswith((".", "!", "?", '"')) for chunk in chunks)
    assert ends >= len(chunks) // 2  # most chunks end where a sentence does
    overlapping = chunking.cut(EmbeddingVersion(chunk_tokens=CHUNK, chunk_overlap=8), encoder, text)
    assert any(before.end > after.start for before, after
               in pairwise(overlapping))


def add_chunked(version: str = "v2", alias: str = "tiny", chunks: int = CHUNK,
                overlap: int = 0) -> EmbeddingVersion:
    call_command("embeddings", "add", TARGET, version, "--model", alias, "--chunks", str(chunks),
                 "--overlap", str(overlap))
    call_command("embeddings", "backfill", TARGET, version, "--inline")
    return EmbeddingVersion.objects.get_version(TARGET, version)


@pytest.mark.django_db(transaction=True)  # indexes are built and dropped CONCURRENTLY
def test_a_chunked_version_searches_rows_by_their_best_chunk_exactly_then_through_hnsw_and_cuts_over(
        make_articles, capsys):
    articles = make_articles(12)
    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny_other", "--layout", "table")
    call_command("embeddings", "backfill", TARGET, "v1", "--inline")
    call_command("embeddings", "index", TARGET, "v1")
    call_command("embeddings", "verify", TARGET, "v1")
    call_command("embeddings", "activate", TARGET, "v1")
    v2 = add_chunked()
    assert (v2.layout, v2.chunk_tokens, v2.chunk_overlap, v2.state) == ("table", CHUNK, 0, "ready")
    assert isinstance(v2.store, stores.ChunkStore)
    assert set(v2.store.relations()) <= set(connection.introspection.table_names())
    assert v2.store.coverage() == (12, 12)
    stored = chunk_rows(v2)
    assert len(stored) > 12 * 5 and {pk for pk, _ in stored} == {a.pk for a in articles}
    field = Article.embedding
    encoder = encoders.for_version(v2)
    for (pk, _), (digest, start, end, _) in list(stored.items())[:40]:
        text = field.source_text(Article.objects.get(pk=pk))
        assert digest == field.source_hash(text[start:end])

    # Exact (no index yet): the k best distinct rows equal brute force over every chunk.
    query = encoder.encode_query("the government's budget and taxes")
    found = search._nearest(field, v2, query, 5, None)
    expected = brute_force(v2, query, 5)
    assert [obj.pk for obj in found] == [pk for pk, _, _ in expected]
    assert len({obj.pk for obj in found}) == 5
    for obj, (_, distance, number) in zip(found, expected, strict=True):
        assert obj.distance == pytest.approx(distance, abs=1e-5)
        assert obj.chunk.number == number
        assert obj.chunk.text == field.source_text(obj)[obj.chunk.start:obj.chunk.end]
    # Filtered through a queryset of the main model: brute force over those rows only.
    sport = Article.objects.filter(category="sports")
    found = search._nearest(field, v2, query, 3, sport)
    assert [obj.pk for obj in found] == [pk for pk, _, _ in brute_force(
        v2, query, 3, set(sport.values_list("pk", flat=True)))]
    assert {obj.category for obj in found} == {"sports"}
    first_four = Article.objects.order_by("pk")[:4]  # a sliced queryset: its rows only
    found = search._nearest(field, v2, query, 3, first_four)
    assert [obj.pk for obj in found] == [pk for pk, _, _ in brute_force(
        v2, query, 3, {a.pk for a in articles[:4]})]

    # Through the HNSW index over chunks, with iterative scans: k distinct rows come back even
    # when k x CANDIDATES_PER_ROW chunks belong to fewer rows (every row has > 5 chunks).
    call_command("embeddings", "index", TARGET, "v2")
    assert v2.store.index_name() in v2.store.indexes()
    literal = search.vector_literal(query)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")  # the index, as on a big table
        cursor.execute("SET LOCAL hnsw.iterative_scan = off")
        cursor.execute("SET LOCAL hnsw.ef_search = 40")
        # Without iterative scans the index gives at most ef_search chunks: too few rows.
        assert len(v2.store.nearest_chunks(literal, "", [], 200)) <= 40
        for k in (1, 7, 12):
            found = search._nearest(field, v2, query, k, None)
            assert len(found) == k == len({obj.pk for obj in found})
            assert [obj.distance for obj in found] == sorted(obj.distance for obj in found)
    found = search._nearest(field, v2, query, 10, sport)
    assert len(found) == min(10, sport.count()) and {obj.category for obj in found} == {"sports"}

    # Activate the chunked version, roll back to the whole-row one, reactivate, drop.
    call_command("embeddings", "verify", TARGET, "v2")
    assert EmbeddingVersion.objects.get_version(TARGET, "v2").verify_passed
    capsys.readouterr()
    call_command("embeddings", "compare", TARGET, "v1", "v2", "--k", "5")
    out = capsys.readouterr().out
    assert "overlap@5" in out and "no row cut: chunks of 32 tokens" in out
    call_command("embeddings", "status", TARGET)
    assert "0% chunked:32" in capsys.readouterr().out
    call_command("embeddings", "activate", TARGET, "v2")
    results = Article.embedding.search("football match", k=4)
    assert len({obj.pk for obj in results}) == 4
    assert {obj.embedding_version for obj in results} == {"v2"}
    assert all(obj.chunk.text for obj in results)
    lifecycle.rollback(TARGET)
    results = Article.embedding.search("football match", k=4)
    assert {obj.embedding_version for obj in results} == {"v1"}
    assert not any(hasattr(obj, "chunk") for obj in results)
    # Both written while one is on standby: an edit reaches the chunks.
    article = articles[0]
    article.title = "A completely new headline about rugby"
    article.save()
    assert v2.store.read_all()[article.pk][1] == field.source_hash(field.source_text(article))
    call_command("embeddings", "activate", TARGET, "v2")
    assert {obj.embedding_version for obj in Article.embedding.search("rugby", k=3)} == {"v2"}
    lifecycle.rollback(TARGET)
    call_command("embeddings", "retire", TARGET, "v2")
    call_command("embeddings", "drop", TARGET, "v2", "--yes")
    assert not set(v2.store.relations()) & set(connection.introspection.table_names())
    assert EmbeddingVersion.objects.get_version(TARGET, "v2").state == State.DROPPED


@pytest.mark.django_db(transaction=True)  # row versions (xmin) of committed writes
def test_an_edit_re_embeds_only_the_chunks_whose_text_changed_by_sync_capture_and_save(
        make_articles):
    articles = make_articles(3)
    version = add_chunked("v1")
    field = Article.embedding
    encoder = encoders.for_version(version)
    before = chunk_rows(version)
    article = Article.objects.get(pk=articles[0].pk)
    chunks = chunking.cut(version, encoder, field.source_text(article))
    last = chunks[-1]
    # The last chunk's text changes (the title and body are "title\n\nbody": edit the body's end).
    edited = article.body.rstrip()
    article.body = edited[: len(edited) - 3] + "xyz"
    Article.objects.filter(pk=article.pk).update(body=article.body)  # no signal: sync below
    stats = sync.refresh_rows(field, [version], [article])
    assert (stats.embedded, stats.chunks_encoded) == (1, 1)
    after = chunk_rows(version)
    assert set(after) == set(before)
    changed = {key for key in after if after[key] != before[key]}
    assert changed == {(article.pk, last.number)}  # every other chunk row untouched (same xmin)
    new_text = field.source_text(article)
    digest, start, end, _ = after[(article.pk, last.number)]
    assert digest == field.source_hash(new_text[start:end])
    stored = version.store.read_vector(article.pk)
    assert stored.shape == (len(chunks), version.dimensions)
    assert np.allclose(stored[-1], encoder.encode_documents([new_text[start:end]])[0], atol=1e-5)

    # A write that bypasses signals, then sync(): a title of the same length changes chunk 0 only.
    title = ("X" if article.title[0] != "X" else "Y") + article.title[1:]
    Article.objects.filter(pk=article.pk).update(title=title)
    article.title = title
    assert Article.embedding.sync() == 1
    synced = chunk_rows(version)
    assert {key for key in synced if synced[key] != after[key]} == {(article.pk, 0)}
    after = synced
    # The same through change capture: the trigger queued the row, the drain re-embeds one chunk.
    title = ("Z" if article.title[0] != "Z" else "W") + article.title[1:]
    Article.objects.filter(pk=article.pk).update(title=title)
    article.title = title
    drained = capture.drain(field)
    assert (drained.refreshed.embedded, drained.refreshed.chunks_encoded) == (1, 1)
    synced = chunk_rows(version)
    assert {key for key in synced if synced[key] != after[key]} == {(article.pk, 0)}
    after = synced

    # A save that shortens the row: its surplus chunks go, the kept ones keep their vectors.
    article.body = article.body[: len(article.body) // 3]
    article.save()  # the dual-write (the version is ready)
    shorter = chunking.cut(version, encoder, field.source_text(article))
    after_save = chunk_rows(version)
    assert sorted(no for pk, no in after_save if pk == article.pk) == list(range(len(shorter)))
    assert version.store.read_all()[article.pk][1] == field.source_hash(field.source_text(article))
    kept = [no for no in range(len(shorter)) if after_save[(article.pk, no)][3] ==
            after[(article.pk, no)][3]]
    assert kept  # the unchanged beginning was not rewritten
    # The other rows were never touched.
    assert {key: row for key, row in after_save.items() if key[0] != article.pk} == {
        key: row for key, row in before.items() if key[0] != article.pk}


@pytest.mark.django_db(transaction=True)  # the update commits: the row gets a new version
def test_a_chunk_write_skips_rows_changed_since_they_were_read_and_a_deleted_row_leaves_no_chunk(
        make_articles):
    articles = make_articles(3)
    version = lifecycle.add(TARGET, "v1", "tiny", chunks=CHUNK)
    field = Article.embedding
    read = stores.lock_rows(field, [a.pk for a in articles])  # their current xmin
    Article.objects.filter(pk=articles[0].pk).update(title="changed after the read")
    one = np.ones(version.dimensions, dtype=np.float32)
    rows = [(a.pk, b"h" * 16, [(0, b"c" * 16, 0, 5, one), (1, b"d" * 16, 5, 9, one)])
            for a in articles]
    with transaction.atomic():
        written = version.store.write(rows, expected=read)
    assert set(written) == {articles[1].pk, articles[2].pk}
    stored = version.store.read_all()
    assert stored[articles[0].pk] == (None, None)
    assert stored[articles[1].pk][0].shape == (2, version.dimensions)
    # A chunk sent without a vector takes the row's stored vector of the same hash (here chunk 1
    # becomes chunk 0); one whose hash the row does not have makes the row a conflict.
    read = stores.lock_rows(field, [a.pk for a in articles])
    with transaction.atomic():
        written = version.store.write([
            (articles[1].pk, b"i" * 16, [(0, b"d" * 16, 0, 4, None)]),
            (articles[2].pk, b"i" * 16, [(0, b"z" * 16, 0, 4, None)]),
        ], expected=read)
    assert set(written) == {articles[1].pk}
    assert chunk_rows(version)[(articles[1].pk, 0)][:3] == (b"d" * 16, 0, 4)
    assert (articles[1].pk, 1) not in chunk_rows(version)
    assert version.store.read_all()[articles[2].pk][1] == b"h" * 16  # left as it was
    Article.objects.filter(pk=articles[1].pk).delete()
    assert not {pk for pk, _ in chunk_rows(version)} & {articles[1].pk}  # ON DELETE CASCADE
    assert version.store.coverage() == (1, 2)


@pytest.mark.django_db
def test_add_refuses_chunks_outside_a_side_table_or_longer_than_the_model_reads(make_articles):
    make_articles(1)
    refusals = {
        ("--layout", "column", "--chunks", "64"): "lives in a table of its own",
        ("--chunks", "300"): "the chunk would be truncated; use 254 tokens or fewer",
        ("--chunks", "64", "--overlap", "64"): "below the chunk size 64",
        ("--overlap", "8"): "give a chunk size too",
    }
    for flags, message in refusals.items():
        with pytest.raises(CommandError, match=message):
            call_command("embeddings", "add", TARGET, "v1", "--model", "tiny", *flags)
    assert not EmbeddingVersion.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_minilm_chunked_by_its_alias_settings_finds_a_sentence_past_the_models_token_limit(
        make_articles, settings, capsys):
    """The real MiniLM reads 256 tokens of a row; chunked (the alias's "chunks": 128 and
    "chunk_overlap": 16), a sentence from the end of a long article finds it, with that chunk.
    (`migrate` passes the same settings through `add`: test_cutover_migrate covers the rest of
    its path.)"""
    models = settings.EMBEDDINGS["MODELS"]
    settings.EMBEDDINGS = {**settings.EMBEDDINGS, "MODELS": {
        **models, "minilm": {**models["minilm"], "chunks": 128, "chunk_overlap": 16}}}
    articles = make_articles(6)
    call_command("embeddings", "add", TARGET, "v1", "--model", "minilm")
    call_command("embeddings", "backfill", TARGET, "v1", "--inline")
    version = EmbeddingVersion.objects.get_version(TARGET, "v1")
    assert (version.chunk_tokens, version.chunk_overlap) == (128, 16)
    field = Article.embedding
    encoder = encoders.for_version(version)
    tokenizer = encoder.model.tokenizer
    long = max(articles, key=lambda a: len(field.source_text(a)))
    text = field.source_text(long)
    assert len(tokenizer(text)["input_ids"]) > 2 * 256
    sentence = [s for s in text.rstrip().split(". ") if len(s.split()) > 8][-1]
    assert len(tokenizer(text[: text.index(sentence)])["input_ids"]) > 256  # past the limit
    best = search._nearest(field, version, encoder.encode_query(sentence), 3, None)[0]
    assert best.pk == long.pk
    assert best.chunk.start <= text.index(sentence) < best.chunk.end
    assert best.chunk.text == text[best.chunk.start:best.chunk.end]
    capsys.readouterr()
    call_command("embeddings", "status", TARGET)
    assert "chunks:128/16" in capsys.readouterr().out


def test_chunk_settings_of_an_alias_are_checked():
    from embeddings_app.config import validate

    base = {"model": "m", "revision": "abc123"}

    def ids(spec: dict) -> set[str]:
        return {problem.id for problem in validate({"MODELS": {"m": {**base, **spec}}})}

    assert ids({"chunks": 128, "chunk_overlap": 0}) == set()
    assert ids({"chunk_overlap": 8}) == {"embeddings.E090"}
    assert ids({"chunks": 64, "chunk_overlap": 64}) == {"embeddings.E091"}
    assert ids({"chunks": 0}) == {"embeddings.E008"}
    assert ids({"chunks": 64, "chunk_overlap": -1}) == {"embeddings.E008"}


@pytest.mark.django_db(transaction=True)
def test_verify_of_a_chunked_version_fails_when_a_stored_chunk_vector_is_not_its_text(
        make_articles):
    articles = make_articles(3)
    version = add_chunked("v1")
    assert lifecycle.verify(TARGET, "v1").passed
    with connection.cursor() as cursor:  # one chunk gets another row's chunk vector
        cursor.execute(f"UPDATE {stores.qn(version.table)} SET vector = (SELECT vector FROM "
                       f"{stores.qn(version.table)} WHERE id = %s AND chunk_no = 0) "
                       "WHERE id = %s AND chunk_no = 0", [articles[1].pk, articles[0].pk])
    report = lifecycle.verify(TARGET, "v1", sample=1000)
    assert not report.passed and report.below_threshold == 1
    assert report.worst[0][0].startswith(f"{articles[0].pk} chunk at 0:")


@pytest.mark.django_db(transaction=True)  # on_commit: the re-embedding runs after the commit
def test_a_save_in_on_commit_mode_writes_the_changed_chunks_after_the_commit(make_articles,
                                                                              settings):
    settings.EMBEDDINGS = {**settings.EMBEDDINGS, "DUAL_WRITE": "on_commit"}
    articles = make_articles(2)
    version = add_chunked("v1")
    before = chunk_rows(version)
    article = articles[0]
    with transaction.atomic():
        article.body = article.body + " A closing sentence about the weather."
        article.save()
        assert chunk_rows(version) == before  # not yet: after the commit
    field = Article.embedding
    assert version.store.read_all()[article.pk][1] == field.source_hash(field.source_text(article))
    after = chunk_rows(version)
    mine = {key: row for key, row in after.items() if key[0] == article.pk}
    assert mine != {key: row for key, row in before.items() if key[0] == article.pk}
    text = field.source_text(article)
    assert all(digest == field.source_hash(text[start:end])
               for digest, start, end, _ in mine.values())
    assert {k: r for k, r in after.items() if k[0] != article.pk} == {
        k: r for k, r in before.items() if k[0] != article.pk}


@pytest.mark.django_db(transaction=True)  # migrate builds the index CONCURRENTLY
def test_migrate_with_chunks_adds_backfills_indexes_verifies_and_activates_a_chunked_version(
        make_articles):
    make_articles(3)
    call_command("embeddings", "migrate", TARGET, "--to", "tiny", "--chunks", str(CHUNK),
                 "--overlap", "4", "--inline")
    version = EmbeddingVersion.objects.get(target=TARGET, state=State.ACTIVE)
    assert (version.chunk_tokens, version.chunk_overlap) == (CHUNK, 4)
    assert version.store.index_name() in version.store.indexes()
    results = Article.embedding.search("a football match", k=3)
    assert len({obj.pk for obj in results}) == 3 and all(obj.chunk.text for obj in results)
    with pytest.raises(CommandError, match="being built with chunks"):
        call_command("embeddings", "add", TARGET, "v9", "--model", "tiny_other", "--chunks", "16")
        call_command("embeddings", "migrate", TARGET, "--to", "tiny_other", "--chunks", "24")
