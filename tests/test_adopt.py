"""`embeddings adopt`: vectors an application already has become a version without re-encoding,
only when the model reproduces them; source hashes catch later edits; a key -> vector table is
copied into the version's own store. (The whole path of a user with a VectorField on their model,
with makemigrations, is tests/test_adopt_user_path.py.)

The "existing" vectors are set up the way the user's own code would have: a column added to the
table (or a table of its own) and filled by raw SQL."""

from __future__ import annotations

import numpy as np
import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from pgvector import Vector

from embeddings_app import encoders, lifecycle, stores, sync
from embeddings_app.config import get_config
from embeddings_app.models import EmbeddingVersion, State
from project.news.models import Article
from tests.conftest import TARGET

pytestmark = pytest.mark.django_db(transaction=True)  # indexes are built CONCURRENTLY

LEGACY_TABLE = "legacy_article_vectors"


@pytest.fixture
def legacy_table():
    """The user's key -> vector table (dropped after the test: it is no store of the app's)."""
    yield LEGACY_TABLE
    with connection.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {LEGACY_TABLE}")


def encode(alias: str, articles: list[Article]) -> np.ndarray:
    encoder = encoders.load(get_config().model(alias))
    return encoder.encode_documents([Article.embedding.source_text(a) for a in articles])


def add_legacy_column(vectors: dict[int, np.ndarray], column: str = "legacy",
                      sql_type: str = "vector(32)") -> None:
    stores.register_types()  # pgvector's types, before the cursor
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE news_article ADD COLUMN {column} {sql_type}")
        for pk, vector in vectors.items():
            cursor.execute(f"UPDATE news_article SET {column} = %s WHERE id = %s",
                           [Vector(vector), pk])


def nudge(vectors: np.ndarray, seed: int = 0) -> np.ndarray:
    """The same vectors, each moved by a tiny random amount (cosine about 0.99999 to the
    original): an adopted vector that was re-encoded would not be these."""
    noise = np.random.default_rng(seed).normal(size=vectors.shape).astype(np.float32)
    return (vectors + 0.002 * noise * np.linalg.norm(vectors, axis=1, keepdims=True)
            / np.sqrt(vectors.shape[1])).astype(np.float32)


def test_a_column_made_by_the_model_is_adopted_in_place_and_not_re_encoded(make_articles, capsys):
    articles = make_articles(14)
    with_vector, without = articles[:11], articles[11:]
    existing = nudge(encode("tiny", with_vector))
    add_legacy_column({a.pk: v for a, v in zip(with_vector, existing, strict=True)})

    call_command("embeddings", "adopt", TARGET, "v1", "--model", "tiny", "--column", "legacy",
                 "--sample", "5", "--inline")
    out = capsys.readouterr().out
    assert "Sample check passed: 5 sampled rows re-embedded: min cosine " in out
    assert float(out.split("min cosine ")[1].split(",")[0]) >= 0.999
    assert "Adopted 11 vectors of column legacy of table news_article as " in out
    assert "used in place" in out

    v1 = EmbeddingVersion.objects.get_version(TARGET, "v1")
    assert (v1.layout, v1.column, v1.hash_column) == ("column", "legacy", "embedding_v1_source_hash")
    assert v1.state == State.READY and "adopted column legacy" in v1.events.first().note
    assert "legacy" in stores.existing_columns("news_article")
    stored = v1.store.read_all()
    for article, vector in zip(with_vector, existing, strict=True):
        np.testing.assert_array_equal(stored[article.pk][0], vector)  # exactly: not re-encoded
    # The rows without a vector were embedded by the backfill that followed.
    fresh = encode("tiny", without)
    for article, vector in zip(without, fresh, strict=True):
        np.testing.assert_allclose(stored[article.pk][0], vector, rtol=1e-4, atol=1e-5)
    assert lifecycle.readiness(v1).problems == []

    call_command("embeddings", "index", TARGET, "v1")
    report = lifecycle.verify(TARGET, "v1")
    assert report.passed, report.problems
    call_command("embeddings", "activate", TARGET, "v1")
    hits = Article.embedding.search(Article.embedding.source_text(with_vector[3]), k=1)
    assert hits[0].pk == with_vector[3].pk and hits[0].embedding_version == "v1"


def test_an_edit_after_adoption_is_caught_by_the_recorded_source_hash(make_articles):
    articles = make_articles(6)
    add_legacy_column({a.pk: v for a, v in zip(articles, encode("tiny", articles), strict=True)})
    call_command("embeddings", "adopt", TARGET, "v1", "--model", "tiny", "--column", "legacy",
                 "--inline")
    v1 = EmbeddingVersion.objects.get_version(TARGET, "v1")
    assert sync.count_stale(Article.embedding, [v1]) == [0]
    # An edit that bypasses save(): the stored hash no longer matches the text.
    Article.objects.filter(pk=articles[2].pk).update(title="Entirely rewritten headline")
    assert sync.count_stale(Article.embedding, [v1]) == [1]
    assert not lifecycle.verify(TARGET, "v1").passed
    assert Article.embedding.sync() == 1
    np.testing.assert_allclose(
        v1.store.read_vector(articles[2].pk),
        encode("tiny", [Article.objects.get(pk=articles[2].pk)])[0], rtol=1e-4, atol=1e-5)
    assert sync.count_stale(Article.embedding, [v1]) == [0]


def test_vectors_of_another_model_are_refused_with_the_measured_cosines_and_nothing_changes(
        make_articles):
    articles = make_articles(8)
    add_legacy_column({a.pk: v for a, v in zip(articles, encode("tiny_other", articles),
                                               strict=True)})
    before = stores.existing_columns("news_article")
    with pytest.raises(CommandError) as refused:
        call_command("embeddings", "adopt", TARGET, "v1", "--model", "tiny", "--column",
                     "legacy", "--sample", "4", "--inline")
    message = str(refused.value)
    assert message.startswith("These vectors were not made by model tiny with its settings: "
                              "4 sampled rows re-embedded: min cosine ")
    assert "4 below 0.999 (lowest: row " in message and "Nothing was adopted" in message
    lowest = [float(part.split(": ")[1]) for part in
              message.split("(lowest: ")[1].split(")")[0].split(", ")]
    assert len(lowest) == 4 and max(lowest) < 0.999
    assert not EmbeddingVersion.objects.filter(target=TARGET).exists()
    assert stores.existing_columns("news_article") == before


def test_verify_all_replaces_the_vectors_the_model_does_not_reproduce(make_articles, capsys):
    articles = make_articles(10)
    existing = encode("tiny", articles)
    wrong = {articles[1].pk, articles[6].pk}
    rng = np.random.default_rng(1)
    vectors = {a.pk: (rng.normal(size=32).astype(np.float32) if a.pk in wrong else v)
               for a, v in zip(articles, existing, strict=True)}
    add_legacy_column(vectors)
    call_command("embeddings", "adopt", TARGET, "v1", "--model", "tiny", "--column", "legacy",
                 "--sample", "10", "--verify-all", "--inline")
    out = capsys.readouterr().out
    assert "Sample check tolerated (--verify-all): 10 sampled rows re-embedded" in out
    assert "--verify-all: 10 vectors re-embedded and compared (min cosine " in out
    assert "2 below 0.999 replaced by the model's (rows " in out
    v1 = EmbeddingVersion.objects.get_version(TARGET, "v1")
    stored = v1.store.read_all()
    for article, vector in zip(articles, existing, strict=True):
        if article.pk in wrong:
            np.testing.assert_allclose(stored[article.pk][0], vector, rtol=1e-4, atol=1e-5)
        else:
            np.testing.assert_array_equal(stored[article.pk][0], vectors[article.pk])
    assert lifecycle.verify(TARGET, "v1", sample=10).passed


def test_verify_all_still_refuses_vectors_that_are_mostly_not_the_models(make_articles):
    articles = make_articles(6)
    add_legacy_column({a.pk: v for a, v in zip(articles, encode("tiny_other", articles),
                                               strict=True)})
    with pytest.raises(CommandError, match=r"^These vectors were not made by model tiny"):
        call_command("embeddings", "adopt", TARGET, "v1", "--model", "tiny", "--column",
                     "legacy", "--verify-all", "--inline")
    assert not EmbeddingVersion.objects.filter(target=TARGET).exists()


def test_a_key_to_vector_table_is_copied_into_a_side_table_and_left_as_it_was(
        make_articles, legacy_table, capsys):
    articles = make_articles(9)
    existing = encode("tiny", articles[:7])
    stores.register_types()
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE TABLE {legacy_table} (article_id integer PRIMARY KEY, "
                       "embedding vector(32), model text)")
        for article, vector in zip(articles[:7], existing, strict=True):
            cursor.execute(f"INSERT INTO {legacy_table} VALUES (%s, %s, 'tiny')",
                           [article.pk, Vector(vector)])
        # A vector whose row was deleted long ago: ignored.
        cursor.execute(f"INSERT INTO {legacy_table} VALUES (%s, %s, 'tiny')",
                       [max(a.pk for a in articles) + 100, Vector(existing[0])])

    call_command("embeddings", "adopt", TARGET, "v1", "--model", "tiny", "--table", legacy_table,
                 "--column", "embedding", "--inline")
    out = capsys.readouterr().out
    assert (f"Adopted 7 vectors of column embedding of table {legacy_table} (keyed by "
            "article_id) as news.Article.embedding@v1 (copied into the version's store") in out
    v1 = EmbeddingVersion.objects.get_version(TARGET, "v1")
    assert (v1.layout, v1.table, v1.state) == ("table", "news_article_embedding_v1", State.READY)
    stored = v1.store.read_all()
    assert len(stored) == 9 and all(vector is not None for vector, _ in stored.values())
    for article, vector in zip(articles[:7], existing, strict=True):
        np.testing.assert_array_equal(stored[article.pk][0], vector)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {legacy_table}")
        assert cursor.fetchone()[0] == 8  # the user's table: only read


@pytest.mark.parametrize(("setup", "args", "message"), [
    ("", ["--column", "nothing"],
     "Table news_article has no column nothing; name the column holding your vectors. "
     "[--column]"),
    ("ALTER TABLE news_article ADD COLUMN legacy real[]", ["--column", "legacy"],
     "Column legacy of table news_article is real[], not a pgvector vector(N) or halfvec(N) with "
     "a fixed dimension; nothing to adopt (ALTER it to vector(N) first, or add a new version)."),
    ("ALTER TABLE news_article ADD COLUMN legacy vector(16)", ["--column", "legacy"],
     "column legacy of table news_article holds vector(16) vectors but model tiny outputs 32 "
     "dimensions: these vectors were not made by this model. Nothing was adopted."),
    ("ALTER TABLE news_article ADD COLUMN legacy vector(32)", ["--column", "legacy"],
     "No row of news_article has a vector in column legacy of table news_article: nothing to "
     "adopt; add a new version with `manage.py embeddings add news.Article.embedding v1 "
     "--model tiny`."),
    (f"CREATE TABLE {LEGACY_TABLE} (article_id integer, embedding vector(32))",
     ["--table", LEGACY_TABLE, "--column", "embedding", "--key", "article_id"],
     f"Column article_id of table {LEGACY_TABLE} is not unique (no unique index or primary key "
     "on it alone): a row could have two vectors. Add a unique index, or name another column. "
     "[--key]"),
    ("", ["--table", "no_such_table", "--column", "embedding"],
     "There is no table no_such_table; name an existing table. [--table]"),
])
def test_what_cannot_be_adopted_is_refused_with_one_line_and_nothing_changes(
        make_articles, legacy_table, setup, args, message):
    make_articles(3)
    if setup:
        with connection.cursor() as cursor:
            cursor.execute(setup)
    before = stores.existing_columns("news_article")
    with pytest.raises(CommandError) as refused:
        call_command("embeddings", "adopt", TARGET, "v1", "--model", "tiny", *args, "--inline")
    assert str(refused.value) == message
    assert not EmbeddingVersion.objects.filter(target=TARGET).exists()
    assert stores.existing_columns("news_article") == before
