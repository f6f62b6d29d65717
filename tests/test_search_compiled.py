"""The plain search (no ``queryset``) runs SQL compiled once by the ORM: it must return exactly
what the ORM path returns, in one query, and follow the active version's column."""

from __future__ import annotations

import numpy as np
import pytest
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext

from embeddings_app import active, search
from embeddings_app.models import EmbeddingVersion
from project.news.models import Article
from tests.conftest import TARGET

pytestmark = pytest.mark.usefixtures("layout")  # both layouts


def test_vector_literal_round_trips_every_float32_exactly(db):
    rng = np.random.default_rng(7)
    vectors = [rng.normal(size=384).astype(np.float32),
               (rng.normal(size=384) * 1e-30).astype(np.float32),  # tiny and subnormal-ish
               np.array([1.0, -0.0, 3.4028235e38, 1.1754944e-38, 0.1], dtype=np.float32)]
    with connection.cursor() as cursor:
        for vector in vectors:
            cursor.execute("SELECT %s::vector::real[]", [search.vector_literal(vector)])
            parsed = np.array(cursor.fetchone()[0], dtype=np.float32)
            assert parsed.tobytes() == vector.tobytes()


@pytest.mark.django_db(transaction=True)
def test_plain_search_equals_the_orm_path_in_one_query(make_articles):
    make_articles(60)
    # Three rows with an empty source: no vector, so never a search result.
    Article.objects.filter(pk__in=Article.objects.order_by("pk").values("pk")[:3]).update(
        title="", body="")
    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny")
    call_command("embeddings", "backfill", TARGET, "v1", "--inline")
    call_command("embeddings", "activate", TARGET, "v1", "--force")
    assert len(Article.embedding.search("markets", k=1)) == 1  # warms snapshot and settings
    version = EmbeddingVersion.objects.get(target=TARGET, version="v1")
    vector = np.random.default_rng(1).normal(size=version.dimensions).astype(np.float32)

    with CaptureQueriesContext(connection) as queries:
        compiled = Article.embedding.search_vector(vector, version="v1", k=60)
    assert len(queries.captured_queries) == 1
    assert "LIMIT 60" in queries.captured_queries[0]["sql"]
    assert len(compiled) == 57

    through_orm = Article.embedding.search_vector(vector, version="v1", k=60,
                                                  queryset=Article.objects.all())
    assert [a.pk for a in compiled] == [a.pk for a in through_orm]
    assert [a.distance for a in compiled] == pytest.approx([a.distance for a in through_orm],
                                                           abs=1e-6)
    for mine, theirs in zip(compiled, through_orm, strict=True):
        assert (mine.title, mine.body, mine.category) == (theirs.title, theirs.body,
                                                          theirs.category)
        assert mine._state.adding is False and mine._state.db == "default"
        assert mine.embedding_version == "v1"
    # Saved like any loaded instance: an UPDATE of that row, not an INSERT.
    compiled[0].category = "edited"
    compiled[0].save()
    assert Article.objects.get(pk=compiled[0].pk).category == "edited"


@pytest.mark.django_db(transaction=True)
def test_plain_search_follows_the_active_column_and_k(make_articles):
    make_articles(30)
    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny")
    call_command("embeddings", "add", TARGET, "v2", "--model", "tiny_other")
    call_command("embeddings", "backfill", TARGET, "v1", "--inline")
    call_command("embeddings", "backfill", TARGET, "v2", "--inline")
    call_command("embeddings", "activate", TARGET, "v1", "--force")

    before = Article.embedding.search("court ruling", k=5)
    assert {a.embedding_version for a in before} == {"v1"} and len(before) == 5
    call_command("embeddings", "activate", TARGET, "v2", "--force")
    active.invalidate()
    with CaptureQueriesContext(connection) as queries:
        after = Article.embedding.search("court ruling", k=7)
    assert len(after) == 7 and {a.embedding_version for a in after} == {"v2"}
    searched = [q["sql"] for q in queries.captured_queries if "<=>" in q["sql"]]
    v1, v2 = (EmbeddingVersion.objects.get_version(TARGET, name) for name in ("v1", "v2"))
    column = f'"{v2.store.relation}"."{v2.store.vector_column}" <=>'
    assert len(searched) == 1 and column in searched[0] and "LIMIT 7" in searched[0]
    assert f'"{v1.store.relation}"."{v1.store.vector_column}"' not in searched[0]
