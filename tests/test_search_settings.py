"""HNSW search parameters reach PostgreSQL whether or not the caller is in a transaction."""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.db import connection, transaction

from embeddings_app import active
from embeddings_app.models import EmbeddingVersion
from project.news.models import Article
from tests.conftest import TARGET


def show(name: str) -> str:
    with connection.cursor() as cursor:
        cursor.execute(f"SHOW {name}")
        return cursor.fetchone()[0]


@pytest.mark.django_db(transaction=True)
def test_session_settings_follow_the_version_and_the_filter(make_articles):
    make_articles(20)
    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny")
    call_command("embeddings", "backfill", TARGET, "v1", "--inline")
    call_command("embeddings", "activate", TARGET, "v1", "--force")

    assert len(Article.embedding.search("markets", k=5)) == 5  # autocommit: session settings
    assert (show("hnsw.ef_search"), show("hnsw.iterative_scan")) == ("40", "off")

    filtered = Article.objects.filter(category="sport")
    assert all(a.category == "sport" for a in Article.embedding.search("goal", queryset=filtered))
    assert show("hnsw.iterative_scan") == "strict_order"
    Article.embedding.search("goal")
    assert show("hnsw.iterative_scan") == "off"

    EmbeddingVersion.objects.filter(target=TARGET, version="v1").update(hnsw_ef_search=123)
    active.invalidate()
    Article.embedding.search("markets")
    assert show("hnsw.ef_search") == "123"

    # A new server connection starts from the defaults: the record must not carry over.
    connection.close()
    Article.embedding.search("markets")
    assert show("hnsw.ef_search") == "123"

    with transaction.atomic():  # inside a transaction: SET LOCAL, gone with it
        connection.cursor().execute("SET hnsw.ef_search = 10")
        Article.embedding.search("markets")
        assert show("hnsw.ef_search") == "123"
    assert show("hnsw.ef_search") == "10"  # the caller's own SET is theirs to keep
