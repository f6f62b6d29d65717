"""A search runs SQL compiled once by the ORM: the plain search (no ``queryset``) as it is, a
search through a queryset whose only clause is a WHERE on the model's own table with that WHERE
(compiled by the ORM each call) in its place. It must return exactly what the ORM path returns,
in one query, and follow the active version's store; any other queryset takes the ORM path."""

from __future__ import annotations

import numpy as np
import pytest
from django.core.management import call_command
from django.db import connection
from django.db.models import Q
from django.db.models.functions import Length
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

    through_orm = list(version.store.search_queryset(Article.objects.all(),
                                                     search.vector_literal(vector), 60)[:60])
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


@pytest.mark.django_db(transaction=True)
def test_a_filtered_search_runs_the_compiled_sql_with_the_querysets_where_and_equals_the_orm_path(
        make_articles, monkeypatch):
    articles = make_articles(60)
    Article.objects.filter(pk=articles[0].pk).update(title="", body="")  # no vector
    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny")
    call_command("embeddings", "backfill", TARGET, "v1", "--inline")
    call_command("embeddings", "activate", TARGET, "v1", "--force")
    version = EmbeddingVersion.objects.get(target=TARGET, version="v1")
    vector = np.random.default_rng(2).normal(size=version.dimensions).astype(np.float32)
    first = Article.objects.order_by("pk").values("pk")
    compiled_shapes = {
        "one column": Article.objects.filter(category="business"),
        "OR, NOT and a LIKE with a percent sign": Article.objects.filter(
            Q(category="sport") | Q(title__contains="%") | ~Q(body__icontains="the")),
        "a subquery, and an ordering the search replaces": Article.objects.exclude(
            category="tech").filter(pk__in=first[:30]).order_by("-title"),
        "every row": Article.objects.all(),
    }
    orm_shapes = {  # an annotation, or a clause besides the WHERE: the ORM path
        "annotated": Article.objects.annotate(n=Length("title")).filter(n__gt=20),
        "only some fields": Article.objects.filter(category="business").only("title"),
    }
    for queryset in (*compiled_shapes.values(), *orm_shapes.values()):  # compiles, sets up
        Article.embedding.search_vector(vector, version="v1", k=25, queryset=queryset)

    orm_calls = []
    real = type(version.store).search_queryset

    def spy(store, queryset, literal, k=None):
        orm_calls.append(queryset)
        return real(store, queryset, literal, k)

    for name, queryset in {**compiled_shapes, **orm_shapes}.items():
        expected = list(real(version.store, queryset, search.vector_literal(vector), 25)[:25])
        assert expected, name
        monkeypatch.setattr(type(version.store), "search_queryset", spy)
        orm_calls.clear()
        with CaptureQueriesContext(connection) as queries:
            found = Article.embedding.search_vector(vector, version="v1", k=25, queryset=queryset)
        monkeypatch.undo()
        # One search statement (and a set_config when the kind of search changes).
        assert len([q for q in queries.captured_queries if "<=>" in q["sql"]]) == 1, name
        assert len(queries.captured_queries) <= 2, name
        assert len(orm_calls) == (name in orm_shapes), name
        assert [a.pk for a in found] == [a.pk for a in expected], name
        assert [a.distance for a in found] == pytest.approx([a.distance for a in expected],
                                                            abs=1e-6), name
        assert all(a.embedding_version == "v1" and a.pk != articles[0].pk for a in found), name
        assert [(a.title, a.category) for a in found] == [(a.title, a.category)
                                                          for a in expected], name

    with CaptureQueriesContext(connection) as queries:
        assert Article.embedding.search_vector(
            vector, version="v1", k=5, queryset=Article.objects.filter(pk__in=[])) == []
    assert len(queries.captured_queries) <= 1  # nothing can match: no search sent

