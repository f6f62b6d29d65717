"""Where a version's vectors live: a column of the user's table against a table of its own.

The same path in both layouts, at 100,000 rows x 384 dimensions (near-free encoder: the vectors
of MiniLM's width without its inference): v1 backfilled with an HNSW index and active; v2 added
and backfilled (timed; the table sizes before and after); v2 indexed and activated, v1 retired and
dropped (sizes, without VACUUM FULL); then searches (p50/p95, with and without a queryset filter
on the main table, and raw SQL on the side table) and save() per dual-write mode, with v2 the
only version written. A hand-written baseline writes the same vectors with COPY into a fresh
table that has no index at all: it and the app's side-table backfill of v2 run interleaved,
``--copy-repeat`` times each at each of ``--copy-batch-sizes`` (the order alternating), every run
from the same state: the other side's output dropped, the article table vacuumed and a
checkpoint taken first (untimed), so no run pays for the writes of the one before.

Run: ``python -m benchmarks.layout [--rows N] [--layouts table]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from benchmarks import harness

TARGET = "news.Article.embedding"
CATEGORIES = 20  # the filtered searches keep one category: 5% of the rows
INDEX_MEMORY = "512MB"  # maintenance_work_mem of the index builds: the graph fits in memory


def _execute(sql: str, params: Any = None) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def _sizes() -> dict[str, int]:
    """Bytes (heap, TOAST and indexes) of the article table and of each stored version's table."""
    from embeddings_app import registry, stores
    from embeddings_app.models import EmbeddingVersion, State

    versions = EmbeddingVersion.objects.for_target(TARGET).exclude(state=State.DROPPED)
    return stores.storage_sizes(registry.get(TARGET), list(versions))


def _backfill(version_name: str, batch_size: int) -> float:
    from embeddings_app import backfill
    from embeddings_app.models import EmbeddingVersion

    version = EmbeddingVersion.objects.get(target=TARGET, version=version_name)
    started = time.perf_counter()
    run, ranges = backfill.start(version, batch_size=batch_size, mode="inline")
    backfill.run_inline(run, ranges)
    seconds = time.perf_counter() - started
    run.refresh_from_db()
    assert run.status == "done", run.last_error
    return seconds


def _index(version_name: str) -> float:
    from embeddings_app import indexes
    from embeddings_app.models import EmbeddingVersion

    _execute(f"SET maintenance_work_mem = '{INDEX_MEMORY}'")
    started = time.perf_counter()
    indexes.build(EmbeddingVersion.objects.get(target=TARGET, version=version_name))
    return time.perf_counter() - started


def _table(rows: int) -> None:
    harness.reset_articles()
    harness.insert_articles(rows)
    _execute(f"UPDATE news_article SET category = 'c' || (id % {CATEGORIES})")
    _execute("VACUUM ANALYZE news_article")


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


def hand_written_copy(batch_size: int) -> float:
    """The same vectors, read and encoded page by page as the app does, written with one binary
    COPY per page into a fresh table without any index or key: the least a write can do."""
    from django.db import connection, transaction
    from pgvector import Vector

    from embeddings_app import encoders, registry, stores
    from embeddings_app.config import get_config

    field = registry.get(TARGET)
    _execute("DROP TABLE IF EXISTS layout_baseline")
    _execute("CREATE TABLE layout_baseline (id bigint, vector vector(384), source_hash bytea)")
    encoder = encoders.load(get_config().model("minilm"))
    stores.register_types()
    started = time.perf_counter()
    for page in _pages(field.source_queryset(), batch_size):
        texts = [field.source_text(obj) for obj in page]
        vectors = encoder.encode_documents(texts)
        with transaction.atomic(), connection.cursor() as cursor, cursor.cursor.copy(
            "COPY layout_baseline (id, vector, source_hash) FROM STDIN WITH (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["bigint", "vector", "bytea"])
            for obj, text, vector in zip(page, texts, vectors, strict=True):
                copy.write_row((obj.pk, Vector(vector), field.source_hash(text)))
    seconds = time.perf_counter() - started
    _execute("DROP TABLE layout_baseline")
    return seconds


def _settle() -> None:
    """The state every compared run starts from: the article table vacuumed (no dead rows, hint
    bits set) and a checkpoint taken (no dirty pages of the run before to write out)."""
    _execute("VACUUM ANALYZE news_article")
    _execute("CHECKPOINT")


def _drop_version(version_name: str) -> None:
    """``version_name`` gone without a trace: its store and its records."""
    from embeddings_app.models import EmbeddingVersion

    for version in EmbeddingVersion.objects.filter(target=TARGET, version=version_name):
        version.store.drop()
        version.delete()


def backfill_against_copy(batch_sizes: list[int], repeat: int) -> dict[int, dict[str, list[float]]]:
    """Per batch size: seconds of the app's side-table backfill of v2 and of the hand-written
    COPY, ``repeat`` runs each, interleaved (app, copy, copy, app, ...), each from a fresh v2
    (added anew) or a fresh baseline table, after ``_settle``. Leaves v2 backfilled."""
    from embeddings_app import lifecycle

    result: dict[int, dict[str, list[float]]] = {}
    for batch_size in batch_sizes:
        times: dict[str, list[float]] = {"app": [], "copy": []}
        for round_ in range(repeat):
            for side in (("app", "copy") if round_ % 2 == 0 else ("copy", "app")):
                _drop_version("v2")
                _execute("DROP TABLE IF EXISTS layout_baseline")
                _settle()
                if side == "app":
                    lifecycle.add(TARGET, "v2", "minilm", layout="table")
                    times["app"].append(_backfill("v2", batch_size))
                else:
                    times["copy"].append(hand_written_copy(batch_size))
        result[batch_size] = times
    if repeat % 2:  # an odd number of rounds ends with the copy: v2 again, as the scenario needs
        _drop_version("v2")
        lifecycle.add(TARGET, "v2", "minilm", layout="table")
        _backfill("v2", batch_sizes[-1])
    return result


def scenario(rows: int, layout: str, queries: int, saves: int, batch_size: int,
             copy_batch_sizes: list[int] | None = None, copy_repeat: int = 0) -> dict[str, Any]:
    """One layout through the whole path (module docstring); every figure of it."""
    from embeddings_app import lifecycle

    result: dict[str, Any] = {"layout": layout}
    _table(rows)
    lifecycle.add(TARGET, "v1", "minilm", layout=layout)
    result["v1_backfill_s"] = _backfill("v1", batch_size)
    result["v1_index_s"] = _index("v1")
    lifecycle.activate(TARGET, "v1", force=True)  # the costs are measured, not the gates
    _execute("VACUUM ANALYZE news_article")
    result["before"] = _sizes()

    lifecycle.add(TARGET, "v2", "minilm", layout=layout)
    result["backfill_s"] = _backfill("v2", batch_size)
    result["after_backfill"] = _sizes()
    if copy_batch_sizes and copy_repeat:
        result["against_copy"] = backfill_against_copy(copy_batch_sizes, copy_repeat)
    result["v2_index_s"] = _index("v2")
    lifecycle.activate(TARGET, "v2", force=True)
    lifecycle.retire(TARGET, "v1")
    lifecycle.drop(TARGET, "v1", yes=True)
    result["after_drop"] = _sizes()
    _execute("VACUUM ANALYZE news_article")
    result["search"] = searches(queries, layout)
    result["save"] = saves_per_mode(saves)
    return result


def searches(count: int, layout: str) -> dict[str, dict[str, float]]:
    """p50/p95 of the app's search_vector (plain and filtered through a queryset of the main
    model) and, for a side table, of raw SQL on the same side table, interleaved."""
    from django.db import connection

    from embeddings_app import search
    from embeddings_app.models import EmbeddingVersion
    from project.news.models import Article

    version = EmbeddingVersion.objects.get(target=TARGET, version="v2")
    rng = np.random.default_rng(1)
    stored = [version.store.read_vector(pk) for pk in
              Article.objects.order_by("?").values_list("pk", flat=True)[:count]]
    vectors = [v + rng.normal(scale=0.02, size=v.shape).astype(np.float32) for v in stored]
    filtered = Article.objects.filter(category="c3")

    def app(vector: np.ndarray) -> Any:
        return Article.embedding.search_vector(vector, version="v2", k=10)

    def app_filtered(vector: np.ndarray) -> Any:
        return Article.embedding.search_vector(vector, version="v2", k=10, queryset=filtered)

    relation = version.table

    def raw(vector: np.ndarray, where: str = "") -> Any:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT a.id, a.title, a.body, a.category, v.vector <=> %s::vector AS distance "
                f"FROM {relation} v JOIN news_article a ON a.id = v.id {where} "
                "ORDER BY distance LIMIT 10", [search.vector_literal(vector)])
            return cursor.fetchall()

    def raw_filtered(vector: np.ndarray) -> Any:
        return raw(vector, "WHERE a.category = 'c3'")

    # Plain and filtered searches in separate passes: the app sets hnsw.iterative_scan for a
    # filtered search (and off for a plain one) on the session only when it changes, so within a
    # pass the raw SQL runs with the settings the app's search of the same kind uses.
    passes = [{"app": app}, {"app_filtered": app_filtered}]
    if layout == "table":
        passes = [{"app": app, "raw": raw}, {"app_filtered": app_filtered, "raw_filtered": raw_filtered}]
    samples: dict[str, list[float]] = {}
    for sides in passes:
        names = list(sides)
        sides[names[0]](vectors[0])  # warm-up, and the search parameters of this kind
        for name in names:
            samples[name] = []
        for i, vector in enumerate(vectors):
            shift = i % len(names)  # interleaved, in a rotating order
            for name in names[shift:] + names[:shift]:
                started = time.perf_counter()
                sides[name](vector)
                samples[name].append(time.perf_counter() - started)
    return {name: harness.latency_summary(values) for name, values in samples.items()}


def saves_per_mode(count: int) -> dict[str, dict[str, float]]:
    """save() latency of an edit of the source text in each dual-write mode (v2 the only
    version written)."""
    from django.conf import settings

    from project.celery import app as celery_app
    from project.news.models import Article

    articles = list(Article.objects.order_by("pk")[:count])
    counter = iter(range(10**9))
    original = copy.deepcopy(settings.EMBEDDINGS)
    result = {}
    for mode in ("sync", "on_commit", "celery"):
        settings.EMBEDDINGS = {**original, "DUAL_WRITE": mode}
        samples = []
        for round_ in range(2):  # the first is a warm-up
            for article in articles:
                article.body = f"{article.body.split(' [edit')[0]} [edit {next(counter)}]"
                started = time.perf_counter()
                article.save()
                if round_:
                    samples.append(time.perf_counter() - started)
        result[mode] = harness.latency_summary(samples)
    settings.EMBEDDINGS = original
    with celery_app.connection_for_write() as conn:  # the refresh tasks the celery mode queued
        conn.default_channel.queue_purge(original.get("QUEUE", "embeddings"))
    return result


def main(argv: list[str] | None = None) -> list[harness.Row]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--saves", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=1000,
                        help="rows per backfill batch of the layout comparison")
    parser.add_argument("--copy-batch-sizes", type=int, nargs="+", default=[1000, 10000],
                        help="batch sizes (rows per batch, and per page of the hand-written COPY) "
                             "of the comparison with the hand-written COPY")
    parser.add_argument("--copy-repeat", type=int, default=2,
                        help="runs of each side per batch size (interleaved)")
    parser.add_argument("--layouts", nargs="+", choices=("column", "table"),
                        default=["column", "table"],
                        help="without column: the side table's figures against raw SQL and the "
                             "hand-written COPY only")
    args = parser.parse_args(argv)
    harness.setup_django()
    # MiniLM's width without its inference; as many distinct vectors as a real table would
    # have near enough (the HNSW graph and its searches are not those of a few duplicates).
    harness.use_near_free_encoder(dimensions=384, distinct=min(args.rows, 65_536))

    load_before = os.getloadavg()
    column = (scenario(args.rows, "column", args.queries, args.saves, args.batch_size)
              if "column" in args.layouts else None)
    table = scenario(args.rows, "table", args.queries, args.saves, args.batch_size,
                     args.copy_batch_sizes, args.copy_repeat)
    load_after = os.getloadavg()

    mib = 1024 * 1024
    main_before = table["before"]["news_article"]
    main_after = table["after_backfill"]["news_article"]
    total_before = sum(table["before"].values())
    total_after = sum(table["after_drop"].values())
    rows = []
    if column is not None:
        rows.append(harness.Row(
            "layout", "backfill v2 (HNSW on active v1): side table", table["backfill_s"], "s",
            "column on the live table", column["backfill_s"],
            table["backfill_s"] / column["backfill_s"], "<= 0.3x",
            table["backfill_s"] / column["backfill_s"] <= 0.3))
    for size, times in table.get("against_copy", {}).items():
        app, raw = min(times["app"]), min(times["copy"])
        means = (sum(times["copy"]) / len(times["copy"])) / (sum(times["app"]) / len(times["app"]))
        rows.append(harness.Row(
            "layout", f"backfill v2, side table, batch {size:,} (fastest of {len(times['app'])})",
            app, "s", "hand-written COPY into a fresh table without index, same pages", raw,
            raw / app, ">= 0.8x", raw / app >= 0.8,
            extra={"seconds": times, "ratio_of_means": means}))
    rows += [
        harness.Row("layout", "side table: main table after v2's backfill", main_after / mib, "MiB",
                    "before v2 was added", main_before / mib, main_after / main_before,
                    "<= 1.05x", main_after / main_before <= 1.05),
        harness.Row("layout", "side table: total after retire + drop of v1 (no VACUUM FULL)",
                    total_after / mib, "MiB", "before v2 was added", total_before / mib,
                    total_after / total_before, "<= 1.1x", total_after / total_before <= 1.1,
                    extra={stage: table[stage] for stage in ("before", "after_backfill",
                                                             "after_drop")}),
    ]
    if column is not None:
        col_before = sum(column["before"].values())
        rows += [
            harness.Row("layout", "column: total after v2's backfill",
                        sum(column["after_backfill"].values()) / mib, "MiB", "before v2 was added",
                        col_before / mib, sum(column["after_backfill"].values()) / col_before),
            harness.Row("layout", "column: total after retire + drop of v1 (no VACUUM FULL)",
                        sum(column["after_drop"].values()) / mib, "MiB", "before v2 was added",
                        col_before / mib, sum(column["after_drop"].values()) / col_before),
        ]
    for label, name in (("", "app"), (", filtered", "app_filtered")):
        for stat in ("p50_ms", "p95_ms"):
            side = table["search"][name][stat]
            raw = table["search"][name.replace("app", "raw")][stat]
            rows.append(harness.Row("layout", f"search_vector{label} {stat[:3]}, side table",
                                    side, "ms", "raw SQL on the side table", raw, side / raw,
                                    "<= 1.2x", side / raw <= 1.2))
            if column is not None:
                col = column["search"][name][stat]
                rows.append(harness.Row("layout", f"search_vector{label} {stat[:3]}, side table",
                                        side, "ms", "column layout", col, side / col))
    for mode in ("sync", "on_commit", "celery"):
        side = table["save"][mode]["p50_ms"]
        col = column["save"][mode]["p50_ms"] if column is not None else None
        rows.append(harness.Row("layout", f"save() {mode} p50, side table", side, "ms",
                                "column layout" if col is not None else "",
                                col, side / col if col is not None else None))
    harness.print_table(rows)
    for size, times in table.get("against_copy", {}).items():
        print(f"batch {size}: app " + " / ".join(f"{t:.2f}" for t in times["app"]) + " s, copy "
              + " / ".join(f"{t:.2f}" for t in times["copy"]) + " s (in run order)")
    print(f"load average: before {load_before}, after {load_after}")
    extra = {"rows": args.rows, "batch_size": args.batch_size, "load_average_before": load_before,
             "load_average_after": load_after,
             "copy_batch_sizes": args.copy_batch_sizes, "copy_repeat": args.copy_repeat,
             "column": None if column is None else {k: v for k, v in column.items()
                                                    if k != "layout"},
             "table": {k: v for k, v in table.items() if k != "layout"}}
    print("results:", harness.write_json("layout", rows, extra))
    harness.reset_articles()
    return rows


if __name__ == "__main__":
    main()
