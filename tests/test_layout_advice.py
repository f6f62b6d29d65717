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
    assert "table layout" not in added  # nor a small table
    found = layout.table_layout("news_article")
    assert (found.fillfactor, found.hnsw_indexes) == (100, ())

    run("backfill", TARGET, "v1", "--inline")
    run("index", TARGET, "v1")
    assert layout.table_layout("news_article").hnsw_indexes == ("news_article_embedding_v1_hnsw",)

    added = run("add", TARGET, "v2", "--model", "tiny_other")
    assert "Table news_article has fillfactor 100 and an HNSW index " \
           "(news_article_embedding_v1_hnsw)" in added
    # ... and the table layout is recommended, with the measured reason and the command's flag.
    assert "Consider the table layout for this version: table news_article carries an HNSW " \
           "index (news_article_embedding_v1_hnsw)" in added
    assert layout.TABLE_LAYOUT_FIGURE in added and "--layout table" in added
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
    # A version in a table of its own does not rewrite news_article: no advice for it.
    added = run("add", TARGET, "v4", "--model", "tiny", "--layout", "table")
    assert "table news_article_embedding_v4" in added
    assert "fillfactor" not in added and "Consider the table layout" not in added


@pytest.mark.django_db
def test_a_large_table_gets_the_table_layout_recommended(make_articles):
    """Above LARGE_TABLE_ROWS (PostgreSQL's row estimate), a column version is advised against
    even without an HNSW index."""
    make_articles(5)
    with connection.cursor() as cursor:  # the planner's estimate, as after ANALYZE of a big table
        cursor.execute("UPDATE pg_class SET reltuples = %s WHERE oid = 'news_article'::regclass",
                       [layout.LARGE_TABLE_ROWS])
    advice = layout.layout_advice("news_article")
    assert advice is not None and f"about {layout.LARGE_TABLE_ROWS:,} rows" in advice
