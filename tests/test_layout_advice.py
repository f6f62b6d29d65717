"""`add` and `status` advise a lower fillfactor when an HNSW index would slow the backfill down."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection

from embeddings_app import layout
from tests.conftest import TARGET


def run(*args: str) -> str:
    out = StringIO()
    call_command("embeddings", *args, stdout=out)
    return out.getvalue()


@pytest.fixture
def fillfactor_reset():
    yield
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE news_article RESET (fillfactor)")


@pytest.mark.django_db(transaction=True)  # the index is built CONCURRENTLY
def test_fillfactor_advice_follows_the_table_layout(make_articles, fillfactor_reset):
    make_articles(20)
    added = run("add", TARGET, "v1", "--model", "tiny")
    assert "fillfactor" not in added  # no HNSW index on the table: nothing to advise
    assert layout.table_layout("news_article") == layout.TableLayout("news_article", 100, ())

    run("backfill", TARGET, "v1", "--inline")
    run("index", TARGET, "v1")
    assert layout.table_layout("news_article").hnsw_indexes == ("news_article_embedding_v1_hnsw",)

    added = run("add", TARGET, "v2", "--model", "tiny_other")
    assert "Table news_article has fillfactor 100 and an HNSW index " \
           "(news_article_embedding_v1_hnsw)" in added
    assert 'ALTER TABLE "news_article" SET (fillfactor = 70)' in added
    assert "fillfactor 100" in run("status")  # v2 is new: the advice still applies

    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE news_article SET (fillfactor = 70)")
    assert layout.table_layout("news_article").fillfactor == 70
    assert "fillfactor" not in run("status")

    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE news_article SET (fillfactor = 90)")
    run("backfill", TARGET, "v2", "--inline")
    assert "fillfactor" not in run("status")  # no version waits for a backfill any more
    assert "fillfactor 90" in run("add", TARGET, "v3", "--model", "tiny")
