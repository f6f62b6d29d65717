"""`drop` removes a retired version's storage (its columns, or its table) and index; the version
row stays as history. Run for both layouts."""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.db import connection

from embeddings_app.models import EmbeddingVersion, State
from project.news.models import Article
from tests.conftest import TARGET


def columns() -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT column_name FROM information_schema.columns "
                       "WHERE table_name = 'news_article'")
        return {row[0] for row in cursor.fetchall()}


def tables() -> set[str]:
    return set(connection.introspection.table_names())


def index_definitions() -> dict[str, str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexname, indexdef FROM pg_indexes")
        return dict(cursor.fetchall())


@pytest.mark.django_db(transaction=True)  # indexes are built and dropped CONCURRENTLY
def test_drop_removes_the_storage_and_its_index(make_articles, layout):
    make_articles(30)
    for version, alias in (("v1", "tiny"), ("v2", "tiny_other")):
        call_command("embeddings", "add", TARGET, version, "--model", alias)
        call_command("embeddings", "backfill", TARGET, version, "--inline")
        call_command("embeddings", "index", TARGET, version)
        call_command("embeddings", "verify", TARGET, version)
    call_command("embeddings", "activate", TARGET, "v1")
    call_command("embeddings", "activate", TARGET, "v2")
    v1 = EmbeddingVersion.objects.get(target=TARGET, version="v1")
    assert v1.layout == layout
    if layout == "column":
        assert {"embedding_v1", "embedding_v1_source_hash"} <= columns()
    else:
        assert v1.table == "news_article_embedding_v1" and v1.table in tables()
        assert not {column for column in columns() if column.startswith("embedding_")}
    index = v1.store.index_name()
    assert f"ON public.{v1.store.relation} USING hnsw" in index_definitions()[index]

    call_command("embeddings", "retire", TARGET, "v1")
    call_command("embeddings", "drop", TARGET, "v1", "--yes")

    assert not {"embedding_v1", "embedding_v1_source_hash"} & columns()
    assert "news_article_embedding_v1" not in tables()
    assert index not in index_definitions()
    v2 = EmbeddingVersion.objects.get(target=TARGET, version="v2")
    assert v2.store.coverage() == (30, 30)  # the active one is intact
    v1.refresh_from_db()
    assert v1.state == State.DROPPED
    assert [e.to_state for e in v1.events.all()][-3:] == ["standby", "retired", "dropped"]
    assert len(Article.embedding.search("government budget", k=5)) == 5
    # Plain queries still work on the table without the column.
    assert Article.objects.count() == 30
