"""Both layouts side by side: a version in a column of the user's table and one in a table of
its own (embeddings_app.stores), the path an existing user takes to move to side tables."""

from __future__ import annotations

import threading
import time

import numpy as np
import psycopg
import pytest
from django.core.management import call_command
from django.db import connection, transaction

from embeddings_app import lifecycle, registry, stores
from embeddings_app.models import EmbeddingVersion, State
from project.news.models import Article, Ticket
from tests.backfill_helpers import all_vectors
from tests.conftest import TARGET

TICKETS = "news.Ticket.embedding"


def columns(table: str = "news_article") -> set[str]:
    return stores.existing_columns(table)


def tables() -> set[str]:
    return set(connection.introspection.table_names())


def prepare(version: str, alias: str, layout: str) -> EmbeddingVersion:
    call_command("embeddings", "add", TARGET, version, "--model", alias, "--layout", layout)
    call_command("embeddings", "backfill", TARGET, version, "--inline")
    call_command("embeddings", "index", TARGET, version)
    call_command("embeddings", "verify", TARGET, version)
    return EmbeddingVersion.objects.get_version(TARGET, version)


def top(query: str) -> list[tuple[int, str]]:
    return [(row.pk, row.embedding_version) for row in Article.embedding.search(query, k=5)]


@pytest.mark.django_db(transaction=True)  # indexes are built and dropped CONCURRENTLY
def test_v1_in_a_column_v2_in_a_side_table_activate_rollback_reactivate_retire_drop(
        make_articles, capsys):
    make_articles(40)
    v1 = prepare("v1", "tiny", "column")
    call_command("embeddings", "activate", TARGET, "v1")
    v2 = prepare("v2", "tiny_other", "table")
    assert (v1.layout, v2.layout) == ("column", "table")
    assert v2.table == "news_article_embedding_v2" and v2.table in tables()
    assert {"embedding_v1", "embedding_v1_source_hash"} <= columns()
    assert not {c for c in columns() if c.startswith("embedding_v2")}  # nothing on the user's table
    assert v2.store.index_name() in v2.store.indexes()  # the HNSW index is on the side table

    call_command("embeddings", "activate", TARGET, "v2")
    assert {version for _, version in top("government budget")} == {"v2"}
    lifecycle.rollback(TARGET)
    assert {version for _, version in top("government budget")} == {"v1"}
    # Both are written on save while one is on standby: an edit reaches the column and the table.
    article = Article.objects.order_by("pk").first()
    article.title = "A completely new headline about rugby"
    article.save()
    text_hash = Article.embedding.source_hash(Article.embedding.source_text(article))
    assert all_vectors(Article.embedding, v1)[article.pk][1] == text_hash
    assert all_vectors(Article.embedding, v2)[article.pk][1] == text_hash
    call_command("embeddings", "activate", TARGET, "v2")
    assert {version for _, version in top("government budget")} == {"v2"}

    capsys.readouterr()
    call_command("embeddings", "status", TARGET)
    status = capsys.readouterr().out.splitlines()
    row = {line.split()[1]: line.split() for line in status if line.startswith(TARGET)}
    assert row["v1"][4] == "column" and row["v2"][4] == "table"

    call_command("embeddings", "retire", TARGET, "v1")
    call_command("embeddings", "drop", TARGET, "v1", "--yes")
    assert not {"embedding_v1", "embedding_v1_source_hash"} & columns()
    assert EmbeddingVersion.objects.get_version(TARGET, "v1").state == State.DROPPED
    assert len(Article.embedding.search("government budget", k=5)) == 5

    # And back to a column: v3 in a column, v2 (in its table) retired and dropped: DROP TABLE.
    prepare("v3", "tiny", "column")
    call_command("embeddings", "activate", TARGET, "v3")
    call_command("embeddings", "retire", TARGET, "v2")
    call_command("embeddings", "drop", TARGET, "v2", "--yes")
    assert "news_article_embedding_v2" not in tables()
    assert EmbeddingVersion.objects.get_version(TARGET, "v2").state == State.DROPPED


@pytest.mark.django_db(transaction=True)
def test_deleting_a_row_deletes_its_side_table_vector(make_articles):
    articles = make_articles(6)
    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny", "--layout", "table")
    call_command("embeddings", "backfill", TARGET, "v1", "--inline")
    v1 = EmbeddingVersion.objects.get_version(TARGET, "v1")
    assert v1.store.coverage() == (6, 6)
    # Each vector records the row version it was written against: the catch-up pass finds
    # nothing to read again.
    assert not v1.store.catch_up(Article.objects.all(), []).exists()
    articles[0].delete()
    Article.objects.filter(pk=articles[1].pk).delete()
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {stores.qn(v1.table)}")
        assert cursor.fetchone()[0] == 4  # ON DELETE CASCADE: no orphan vector
    assert v1.store.coverage() == (4, 4)


@pytest.mark.django_db(transaction=True)
def test_a_side_table_keyed_by_a_uuid():
    tickets = Ticket.objects.bulk_create([Ticket(subject=f"printer {i} jams")
                                          for i in range(7)])
    lifecycle.add(TICKETS, "v1", "tiny", layout="table")
    version = EmbeddingVersion.objects.get_version(TICKETS, "v1")
    with connection.cursor() as cursor:
        cursor.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                       "WHERE attrelid = %s::regclass AND attname = 'id'", [version.table])
        assert cursor.fetchone()[0] == "uuid"
    call_command("embeddings", "backfill", TICKETS, "v1", "--inline")
    stored = all_vectors(registry.get(TICKETS), version)
    assert set(stored) == {ticket.pk for ticket in tickets}
    assert all(vector is not None for vector, _ in stored.values())
    assert not version.store.catch_up(Ticket.objects.all(), []).exists()


@pytest.mark.django_db(transaction=True)  # the update commits: the row gets a new version
def test_a_side_table_write_skips_rows_changed_since_they_were_read(make_articles):
    """The compare-and-set of a side table: the user's row's version (xmin) is the guard."""
    articles = make_articles(3)
    version = lifecycle.add(TARGET, "v1", "tiny", layout="table")
    field = Article.embedding
    versions = stores.lock_rows(field, [a.pk for a in articles])  # their current xmin
    Article.objects.filter(pk=articles[0].pk).update(title="changed after the read")
    rows = [(a.pk, b"h" * 16, np.ones(version.dimensions, dtype=np.float32)) for a in articles]
    with transaction.atomic():
        written = version.store.write(rows, expected=versions)
    assert set(written) == {articles[1].pk, articles[2].pk}
    assert all_vectors(field, version)[articles[0].pk] == (None, None)


@pytest.mark.django_db(transaction=True)  # two sessions
def test_a_side_table_write_meets_a_concurrent_writer_that_inserted_first_and_overwrites_it(
        make_articles):
    """The direct COPY of new rows waits for another session's uncommitted vector of one of its
    rows; when that commits, the COPY's key clash sends the rows to the upsert, locks kept."""
    articles = make_articles(3)
    version = lifecycle.add(TARGET, "v1", "tiny", layout="table")
    field = Article.embedding
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, xmin::text FROM news_article")
        versions = dict(cursor.fetchall())
    other = psycopg.connect(**connection.get_connection_params())
    other.execute(f"INSERT INTO {stores.qn(version.table)} (id, vector, source_hash, row_version) "
                  "SELECT id, NULL, '\\x00', xmin FROM news_article WHERE id = %s",
                  [articles[1].pk])  # not committed yet: invisible to the write's lock read

    def commit_later() -> None:
        time.sleep(0.5)  # the write's COPY is waiting for this row's key by then
        other.commit()

    committer = threading.Thread(target=commit_later)
    committer.start()
    rows = [(a.pk, b"h" * 16, np.full(version.dimensions, 0.5, dtype=np.float32))
            for a in articles]
    try:
        with transaction.atomic():
            written = version.store.write(rows, expected=versions)
    finally:
        committer.join()
        other.close()
    assert written == {a.pk: versions[a.pk] for a in articles}
    stored = all_vectors(field, version)
    assert all(stored[a.pk][1] == b"h" * 16 for a in articles)
    assert np.allclose(stored[articles[1].pk][0], 0.5)
