"""The cost of one column per version on the live table.

The same backfill of a new version (near-free encoder, 384 dimensions) with and without an HNSW
index on the old version's column, with the default fillfactor and with fillfactor 70; table and
index sizes before, after the backfill, after `drop` of the old version and after VACUUM; and the
same work written to a separate per-version table instead.

Run: ``python -m benchmarks.layout [--rows N]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from typing import Any

from benchmarks import harness

TARGET = "news.Article.embedding"


def _stats() -> dict[str, int]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_force_next_flush()")
        cursor.execute("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
                       "WHERE relname = 'news_article'")
        updated, hot = cursor.fetchone()
    return {"updated": int(updated), "hot": int(hot)}


def _execute(sql: str) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(sql)


def _backfill(version_name: str) -> float:
    from embeddings_app import backfill
    from embeddings_app.models import EmbeddingVersion

    version = EmbeddingVersion.objects.get(target=TARGET, version=version_name)
    started = time.perf_counter()
    run, ranges = backfill.start(version, mode="inline")
    backfill.run_inline(run, ranges)
    return time.perf_counter() - started


def _base_table(rows: int, fillfactor: int | None, index_old: bool) -> None:
    from embeddings_app import indexes, lifecycle
    from embeddings_app.models import EmbeddingVersion

    harness.reset_articles()
    _execute(f"ALTER TABLE news_article SET (fillfactor = {fillfactor or 100})")
    harness.insert_articles(rows)
    lifecycle.add(TARGET, "v1", "minilm")
    _backfill("v1")
    if index_old:
        indexes.build(EmbeddingVersion.objects.get(target=TARGET, version="v1"))
    _execute("VACUUM ANALYZE news_article")


def column_scenario(rows: int, *, index_old: bool, fillfactor: int | None) -> dict[str, Any]:
    from embeddings_app import lifecycle

    _base_table(rows, fillfactor, index_old)
    result: dict[str, Any] = {"before": harness.relation_sizes()}
    lifecycle.add(TARGET, "v2", "minilm")
    counters = _stats()
    result["backfill_s"] = _backfill("v2")
    after = _stats()
    result["updates"] = after["updated"] - counters["updated"]
    result["hot_updates"] = after["hot"] - counters["hot"]
    result["after_backfill"] = harness.relation_sizes()
    lifecycle.retire(TARGET, "v1")
    lifecycle.drop(TARGET, "v1")
    result["after_drop"] = harness.relation_sizes()
    _execute("VACUUM news_article")
    result["after_vacuum"] = harness.relation_sizes()
    _execute("VACUUM FULL news_article")
    result["after_vacuum_full"] = harness.relation_sizes()
    _execute("ALTER TABLE news_article RESET (fillfactor)")
    return result


def _pages(queryset: Any, page_size: int) -> Iterator[list[Any]]:
    """``queryset`` by primary key, a page of model instances at a time (keyset pagination)."""
    queryset = queryset.order_by("pk")
    last = None
    while True:
        page = list((queryset if last is None else queryset.filter(pk__gt=last))[:page_size])
        if not page:
            return
        yield page
        last = page[-1].pk


def side_table_scenario(rows: int) -> dict[str, Any]:
    """The new version written to its own table (id, vector, source hash) instead."""
    from django.db import connection, transaction
    from pgvector import Vector

    from embeddings_app import encoders, registry, storage
    from embeddings_app.config import get_config

    _base_table(rows, None, index_old=True)
    field = registry.get(TARGET)
    _execute("DROP TABLE IF EXISTS news_article_embedding_v2")
    _execute("CREATE TABLE news_article_embedding_v2 (id bigint PRIMARY KEY, "
             "vec vector(384), source_hash bytea)")
    encoder = encoders.load(get_config().model("minilm"))
    started = time.perf_counter()
    storage._register_types()
    for page in _pages(field.source_queryset(), get_config().batch_size):
        texts = [field.source_text(obj) for obj in page]
        vectors = encoder.encode_documents(texts)
        with transaction.atomic(), connection.cursor() as cursor, cursor.cursor.copy(
            "COPY news_article_embedding_v2 (id, vec, source_hash) FROM STDIN WITH (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["bigint", "vector", "bytea"])
            for obj, text, vector in zip(page, texts, vectors, strict=True):
                copy.write_row((obj.pk, Vector(vector), field.source_hash(text)))
    seconds = time.perf_counter() - started
    result = {"backfill_s": seconds, "main_table": harness.relation_sizes(),
              "side_table": harness.relation_sizes("news_article_embedding_v2")}
    _execute("DROP TABLE news_article_embedding_v2")
    return result


def main(argv: list[str] | None = None) -> list[harness.Row]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=50_000)
    args = parser.parse_args(argv)
    harness.setup_django()
    harness.use_near_free_encoder(dimensions=384)  # MiniLM's width, without its inference

    plain = column_scenario(args.rows, index_old=False, fillfactor=None)
    indexed = column_scenario(args.rows, index_old=True, fillfactor=None)
    indexed_ff = column_scenario(args.rows, index_old=True, fillfactor=70)
    side = side_table_scenario(args.rows)

    mib = 1024 * 1024
    rows = [
        harness.Row("layout", "backfill v2, HNSW on v1's column", indexed["backfill_s"], "s",
                    "no index on v1", plain["backfill_s"], indexed["backfill_s"] / plain["backfill_s"],
                    extra={"hot_updates": indexed["hot_updates"], "updates": indexed["updates"]}),
        harness.Row("layout", "backfill v2, HNSW on v1, fillfactor 70", indexed_ff["backfill_s"], "s",
                    "fillfactor 100", indexed["backfill_s"],
                    indexed_ff["backfill_s"] / indexed["backfill_s"],
                    extra={"hot_updates": indexed_ff["hot_updates"], "updates": indexed_ff["updates"]}),
        harness.Row("layout", "backfill v2 into a side table", side["backfill_s"], "s",
                    "column on the live table (HNSW on v1)", indexed["backfill_s"],
                    side["backfill_s"] / indexed["backfill_s"]),
    ]
    for name, scenario in (("no index", plain), ("HNSW on v1", indexed),
                           ("HNSW on v1, ff 70", indexed_ff)):
        for stage in ("after_backfill", "after_drop", "after_vacuum", "after_vacuum_full"):
            total = scenario[stage]["table_bytes"] + scenario[stage]["index_bytes"]
            before = scenario["before"]["table_bytes"] + scenario["before"]["index_bytes"]
            rows.append(harness.Row("layout", f"{name}: table+indexes {stage.replace('_', ' ')}",
                                    total / mib, "MiB", "before adding v2", before / mib,
                                    total / before,
                                    extra={**scenario[stage], "hot_updates": scenario["hot_updates"]}))
    side_total = sum(side["side_table"].values()) + 0
    rows.append(harness.Row("layout", "side table (heap + pk index) for v2", side_total / mib, "MiB",
                            "main table + indexes", sum(side["main_table"].values()) / mib,
                            side_total / sum(side["main_table"].values())))
    harness.print_table(rows)
    print("results:", harness.write_json("layout", rows, {"rows": args.rows}))
    return rows


if __name__ == "__main__":
    main()
