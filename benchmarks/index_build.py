"""HNSW build time with the app's build-session settings against pgvector's defaults.

One version of 768 dimensions (the near-free encoder: no model runs) over ``--rows`` rows, its vectors
unit vectors spread around 1,000 random centres (the cluster structure HNSW works on), written
through the app's bulk write path. The same index (m 16, ef_construction 64) is built twice by
``indexes.build``, dropped in between, the table read once before each build (warm cache):

* baseline: PostgreSQL's and pgvector's defaults: ``maintenance_work_mem`` 64MB,
  ``max_parallel_maintenance_workers`` 2;
* the app's settings: ``maintenance_work_mem`` = the memory estimate (1.3 x rows x (8 + 4 x
  dims), pgvector#844) rounded up, and ``--workers`` parallel workers (default 2, as the
  baseline: the memory is the difference).

Run: ``python -m benchmarks.index_build [--rows N] [--workers W]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks import harness

TARGET = "news.Article.embedding"
DEFAULT_MEMORY = "64MB"  # PostgreSQL's default maintenance_work_mem
DEFAULT_WORKERS = 2  # PostgreSQL's default max_parallel_maintenance_workers


def _build(version: object, memory: str, workers: int) -> tuple[float, list[str], dict]:
    from django.db import connection

    from embeddings_app import indexes

    store = version.store  # type: ignore[attr-defined]
    with connection.cursor() as cursor:
        cursor.execute(store.drop_index_sql())
        cursor.execute(f"SELECT count({store.vector_column}) FROM {store.relation}")  # warm
    plans: list[indexes.BuildPlan] = []
    started = time.perf_counter()
    indexes.build(version, maintenance_work_mem=memory, parallel_workers=workers,  # type: ignore[arg-type]
                  on_plan=plans.append)
    seconds = time.perf_counter() - started
    return seconds, plans[-1].notices, plans[-1].session


def main(argv: list[str] | None = None) -> list[harness.Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    args = parser.parse_args(argv)
    harness.setup_django()
    from embeddings_app import indexes, lifecycle

    harness.use_near_free_encoder(dimensions=768)  # vectors of mpnet's width, no inference
    harness.reset_articles()
    version = lifecycle.add(TARGET, "v1", "minilm")
    dims = version.dimensions
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(1000, dims)).astype(np.float32)
    vectors = harness.spread_vectors(centres, args.rows, noise=0.6)
    with harness.stopwatch() as load:
        harness.load_precomputed("v1", [f"row {i}" for i in range(args.rows)], vectors)
    estimate = indexes.memory_estimate(args.rows, dims)
    memory = indexes.size_label(estimate)
    print(f"{args.rows:,} x {dims} loaded in {load['seconds']:.0f}s; estimate {memory}")

    base_s, base_notices, base_session = _build(version, DEFAULT_MEMORY, DEFAULT_WORKERS)
    print(f"defaults ({base_session}): {base_s:.1f}s; notices: {base_notices}")
    app_s, app_notices, app_session = _build(version, memory, args.workers)
    print(f"app settings ({app_session}): {app_s:.1f}s; notices: {app_notices}")
    rows = [harness.Row(
        "index_build", f"HNSW build {args.rows:,} x {dims}, maintenance_work_mem {memory} "
        f"(the estimate), {args.workers} workers", app_s, "s",
        baseline=f"pgvector defaults ({DEFAULT_MEMORY}, {DEFAULT_WORKERS} workers)",
        baseline_value=base_s, ratio=base_s / app_s,
        extra={"baseline_notices": base_notices, "app_notices": app_notices,
               "baseline_session": base_session, "app_session": app_session})]
    harness.print_table(rows)
    print("results:", harness.write_json("index_build", rows, {"rows": args.rows, "dims": dims,
                                                               "workers": args.workers}))
    harness.reset_articles()
    return rows


if __name__ == "__main__":
    main()
