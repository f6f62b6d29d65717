"""Backfill throughput, each figure against a baseline measured in the same run:

1. Encode-bound (MiniLM, real BBC News articles): raw ``model.encode`` on the same texts with the
   same batch size and encode settings, against an inline backfill of a fresh version (planning,
   keyset reads, hashing, encode, compare-and-set write, catch-up pass). Target >= 0.9x.
   ``--device DEVICE`` (and ``--encode-batch-size N``, ``--alias ALIAS``) runs this process, and
   the worker processes of part 2, as a worker started with ``EMBEDDINGS_DEVICE=DEVICE``: both
   sides on that device with the same texts per forward pass (docs/devices.md). On a GPU:
   ``--device cuda --docs 2000 --batch-size 1024 --skip workers database db-workers``.
2. Workers: the same MiniLM backfill of the same articles dispatched to real Celery worker
   processes: 2 processes with 1 torch thread each against 1 process with 2 torch threads (the
   2 cores either way), and 2 processes with torch's default threads; dispatch to run done.
3. Database-bound (a near-free encoder: a table lookup instead of inference), 100,000 rows: the
   app's backfill against (a) a loop of ``save()`` (dual-write re-embeds each row in its own
   transaction), timed on a sample of the rows, target >= 10x; and (b) the same work by hand as
   fast as I can write it (one read, one binary COPY, one ``UPDATE ... FROM``), target >= 0.8x;
   inline at several batch sizes, and on real worker processes (1 against 2, 2 against (b)).
4. The bulk write alone: binary COPY into a temp table + one ``UPDATE ... FROM`` (what
   ``ColumnStore.write`` does) against ``UPDATE ... FROM unnest(...)`` with the vectors as
   text, and against one ``UPDATE`` per row (``executemany``).

Run: ``python -m benchmarks.backfill --help`` for the sizes.
"""


from __future__ import annotations

import argparse
import os
import time
from typing import Any

from benchmarks import harness

TARGET = "news.Article.embedding"


def _inline_backfill(version_name: str, alias: str, batch_size: int) -> float:
    """Add ``version_name`` and backfill it inline; returns the seconds of the backfill."""
    from embeddings_app import backfill, lifecycle

    version = lifecycle.add(TARGET, version_name, alias)
    with harness.stopwatch() as clock:
        run, ranges = backfill.start(version, batch_size=batch_size, mode="inline")
        backfill.run_inline(run, ranges)
    run.refresh_from_db()
    assert run.status == "done" and run.rows_embedded == run.rows_total, (run.status,
                                                                          run.last_error)
    return clock["seconds"]


def encode_bound(docs: int, batch_size: int, repeat: int, alias: str = "minilm"
                 ) -> list[harness.Row]:
    import numpy as np

    from embeddings_app import encoders, registry
    from embeddings_app.config import get_config
    from project.news.models import Article

    harness.reset_articles()
    harness.insert_corpus_articles(docs)
    field = registry.get(TARGET)
    texts = [field.source_text(a) for a in field.source_queryset().order_by("pk")]
    encoder = encoders.load(get_config().model(alias))  # this process's device and pass size

    def raw() -> float:
        # The same call the backfill makes per batch: model.encode on batch_size texts at a time,
        # with the encoder's internal batch size and its normalize/prompt settings.
        started = time.perf_counter()
        for start in range(0, len(texts), batch_size):
            vectors = encoder.model.encode(
                texts[start:start + batch_size], prompt=encoder.spec.document_prompt,
                batch_size=encoder.encode_batch_size, normalize_embeddings=encoder.spec.normalize,
                truncate_dim=encoder.spec.truncate_dim, convert_to_numpy=True,
                show_progress_bar=False)
            assert np.asarray(vectors).shape[0] == len(texts[start:start + batch_size])
        return time.perf_counter() - started

    encoder.model.encode(texts[:batch_size], batch_size=encoder.encode_batch_size)  # warm-up
    raw_runs, backfill_runs = [], []
    for attempt in range(repeat):  # interleaved, so a load change on the machine hits both
        raw_runs.append(raw())
        backfill_runs.append(_inline_backfill(f"b{attempt}", alias, batch_size))
    # The fastest run of each side: on a shared machine other processes only ever slow a run
    # down, so the minimum is the least disturbed figure (the means are kept in the JSON).
    raw_rate = docs / min(raw_runs)
    backfill_rate = docs / min(backfill_runs)
    assert Article.objects.count() == docs
    ratio = backfill_rate / raw_rate
    mean_ratio = (sum(raw_runs) / len(raw_runs)) / (sum(backfill_runs) / len(backfill_runs))
    where = f"on {encoder.device}, {encoder.encode_batch_size} texts per forward pass"
    return [harness.Row("backfill", f"{alias} backfill, {docs} articles, batch {batch_size}, "
                        f"{where}", backfill_rate, "rows/s",
                        f"raw model.encode on {encoder.device}", raw_rate, ratio,
                        ">= 0.9x", ratio >= 0.9,
                        {"raw_s": raw_runs, "backfill_s": backfill_runs,
                         "ratio_of_means": mean_ratio, "device": encoder.device,
                         "encode_batch_size": encoder.encode_batch_size,
                         "precision": encoder.precision})]


def _vacuum() -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE news_article")


def _raw_copy_update(version_name: str) -> float:
    """The same work as a backfill, by hand, as fast as I can write it: one read of every row's
    key and source text (the text joined in SQL), the same near-free vectors and the same source
    hashes, one binary COPY (psycopg 3, pgvector's binary type) into a temporary table and one
    ``UPDATE ... FROM``, in one transaction. No lock, no compare-and-set, no progress records, no
    catch-up pass. Returns its seconds."""
    from django.db import connection, transaction
    from pgvector import Vector

    from embeddings_app import encoders, lifecycle, registry, stores

    field = registry.get(TARGET)
    version = lifecycle.add(TARGET, version_name, "tiny")
    encoder = encoders.for_version(version)
    source_hash = field.source_hash
    stores.register_types()
    with harness.stopwatch() as clock, transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT id, concat_ws(E'\\n\\n', NULLIF(title, ''), NULLIF(body, '')) "
                       "FROM news_article")
        rows = cursor.fetchall()
        texts = [text for _, text in rows]
        vectors = encoder.encode_documents(texts)
        cursor.execute("CREATE TEMP TABLE raw_incoming (pk bigint, vec vector(384), "
                       "source_hash bytea) ON COMMIT DROP")
        with cursor.cursor.copy("COPY raw_incoming (pk, vec, source_hash) FROM STDIN "
                                "WITH (FORMAT BINARY)") as copy:
            copy.set_types(["bigint", "vector", "bytea"])
            for (pk, text), vector in zip(rows, vectors, strict=True):
                copy.write_row((pk, Vector(vector), source_hash(text)))
        cursor.execute(
            f"UPDATE news_article AS t SET {stores.qn(version.store.vector_column)} = s.vec, "
            f"{stores.qn(version.store.hash_column)} = s.source_hash "
            "FROM raw_incoming AS s WHERE t.id = s.pk")
        assert cursor.rowcount == len(rows)
    return clock["seconds"]


def _same_end_state(a: str, b: str) -> int:
    """Rows whose vector or source hash differ between versions ``a`` and ``b``."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT count(*) FROM news_article WHERE embedding_{a} IS DISTINCT FROM embedding_{b}"
            f" OR embedding_{a}_source_hash IS DISTINCT FROM embedding_{b}_source_hash "
            f"OR embedding_{a}_source_hash IS NULL")
        return cursor.fetchone()[0]


def _fresh_table(rows: int) -> None:
    """``rows`` new articles in an emptied, vacuumed table. Every write-path run starts from the
    same table: a run's column (its 100,000 vectors) and its dead row versions would otherwise
    make every later run copy wider rows (measured: the first run was up to 1.8x faster than
    the same run last)."""
    harness.reset_articles()
    harness.insert_articles(rows)
    _vacuum()


def database_bound(rows: int, batch_sizes: list[int], default_batch_size: int,
                   naive_rows: int) -> list[harness.Row]:
    """The write path with a near-free encoder over ``rows`` rows: the app's inline backfill at
    each of ``batch_sizes`` against (a) a loop of ``save()`` (timed on the first ``naive_rows``
    rows: rows/s is the unit) and (b) hand-written COPY + UPDATE over the same rows. Order
    raw, app at each size, app at each size reversed, raw, so a drift of the machine's speed
    hits every side alike; each run on a freshly filled and vacuumed table (untimed). One more
    app run at the default batch size."""
    from django.conf import settings

    from embeddings_app import lifecycle
    from embeddings_app.models import State
    from project.news.models import Article

    harness.use_near_free_encoder(dimensions=384)

    def fresh_table() -> None:
        _fresh_table(rows)

    # Untimed: the app's end state is the raw SQL's (every row's vector and source hash).
    fresh_table()
    _raw_copy_update("rawcheck")
    _inline_backfill("appcheck", "tiny", batch_sizes[0])
    differing = _same_end_state("appcheck", "rawcheck")
    assert differing == 0, f"{differing} rows differ between the app's and the raw end state"

    runs: dict[Any, list[float]] = {"raw": [], **{size: [] for size in batch_sizes}}
    order: list[Any] = ["raw", *batch_sizes, *reversed(batch_sizes), "raw"]
    for index, side in enumerate(order):
        fresh_table()
        seconds = (_raw_copy_update(f"raw{index}") if side == "raw"
                   else _inline_backfill(f"app{index}", "tiny", side))
        runs[side].append(seconds)
        label = "raw" if side == "raw" else f"app, batch {side}"
        print(f"  {label}: {seconds:.2f} s = {rows / seconds:,.0f} rows/s", flush=True)
    fresh_table()
    default_s = _inline_backfill("appdefault", "tiny", default_batch_size)
    print(f"  app at batch {default_batch_size}: {default_s:.2f} s", flush=True)

    fresh_table()
    naive = lifecycle.add(TARGET, "naive", "tiny")
    lifecycle.transition(naive, State.BACKFILLING, note="benchmark: written by save()")
    original = settings.EMBEDDINGS
    settings.EMBEDDINGS = {**original, "DUAL_WRITE": "sync"}
    try:
        with harness.stopwatch() as clock:
            for article in Article.objects.order_by("pk")[:naive_rows].iterator(chunk_size=1000):
                article.save()  # dual-write: this row's vector, in its own transaction
    finally:
        settings.EMBEDDINGS = original
    naive_s = clock["seconds"]
    assert naive.store.coverage()[0] == naive_rows

    raw_rate = rows / min(runs["raw"])  # fastest of each side, as in the encode-bound part
    naive_rate = naive_rows / naive_s
    measure = f"write path, near-free encoder, {rows:,} rows, 384 dims"
    result = []
    for size in batch_sizes:
        app_rate = rows / min(runs[size])
        extra = {"app_s": runs[size], "raw_s": runs["raw"], "batch_size": size,
                 "ratio_of_means": (sum(runs["raw"]) / len(runs["raw"]))
                 / (sum(runs[size]) / len(runs[size]))}
        result += [
            harness.Row("backfill", f"{measure}, batch {size}", app_rate, "rows/s",
                        f"per-row save() loop (first {naive_rows:,} rows)", naive_rate,
                        app_rate / naive_rate, ">= 10x", app_rate / naive_rate >= 10, extra),
            harness.Row("backfill", f"{measure}, batch {size}", app_rate, "rows/s",
                        "raw SQL: one read, one binary COPY, one UPDATE FROM", raw_rate,
                        app_rate / raw_rate, ">= 0.8x", app_rate / raw_rate >= 0.8, extra),
        ]
    result.append(harness.Row(
        "backfill", f"{measure}, default batch {default_batch_size}", rows / default_s, "rows/s",
        "raw SQL (same run)", raw_rate, (rows / default_s) / raw_rate, ">= 0.8x",
        (rows / default_s) / raw_rate >= 0.8, {"app_s": default_s}))
    return result


def workers(docs: int, batch_size: int, repeat: int) -> list[harness.Row]:
    """MiniLM backfill of the same real articles on real Celery worker processes (prefork, one
    child each): 1 worker with 2 torch threads against 2 workers with 1 torch thread each (the
    machine's 2 cores either way), wall clock from dispatch to the run's end. Interleaved; the
    workers are started once and warmed up (model loaded in each) before any timed run."""
    import tempfile
    from pathlib import Path

    from django.conf import settings

    from embeddings_app import backfill, lifecycle, tasks
    from embeddings_app.models import BackfillRun
    from project.news.models import Ticket
    from tests.workers import WorkerProcess, wait_for_run

    harness.reset_articles()
    harness.insert_corpus_articles(docs)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    configs: dict[str, tuple[int, dict[str, str | None]]] = {  # queue -> (workers, env of each)
        "bench-1w": (1, {"OMP_NUM_THREADS": "2"}),
        "bench-2w": (2, {"OMP_NUM_THREADS": "1"}),
        # torch's default: as many threads as cores in each process (2 x 2 on 2 cores)
        "bench-2wd": (2, {"OMP_NUM_THREADS": None}),
    }
    started: list[WorkerProcess] = []
    original = settings.EMBEDDINGS
    try:
        for queue, (count, env) in configs.items():
            started += [WorkerProcess(concurrency=1, extra_env=env, queue=queue, name="bench",
                                      log_path=log_dir / f"{queue}-{n}.log", ready_timeout=120)
                        for n in range(count)]

        def backfill_on(queue: str, target: str, name: str, size: int) -> tuple[float, Any]:
            settings.EMBEDDINGS = {**original, "QUEUE": queue}
            version = lifecycle.add(target, name, "minilm")
            run, ranges = backfill.start(version, batch_size=size)
            started_at = time.perf_counter()
            tasks.dispatch(run, ranges)
            run = wait_for_run(run.pk, timeout=600, poll=0.05)
            seconds = time.perf_counter() - started_at
            assert run.status == BackfillRun.Status.DONE, run.last_error
            return seconds, run

        # Warm-up: every worker process loads MiniLM (tickets, one row per batch), untimed.
        harness.reset_target("news.Ticket.embedding")
        Ticket.objects.bulk_create([Ticket(subject=f"Warm-up ticket {i}", raw_body=b"warm up")
                                    for i in range(12)])
        for queue, (count, _) in configs.items():
            for attempt in range(5):
                _, run = backfill_on(queue, "news.Ticket.embedding", f"w{queue[6:]}{attempt}", 1)
                if len(set(run.batches.values_list("worker", flat=True))) >= count:
                    break
            else:
                raise RuntimeError(f"{queue}: not every worker ran a warm-up batch: "
                                   f"{list(run.batches.values_list('worker', 'status'))}")

        times: dict[str, list[float]] = {queue: [] for queue in configs}
        for attempt in range(repeat):
            order = list(configs) if attempt % 2 == 0 else list(reversed(configs))
            for queue in order:
                seconds, run = backfill_on(queue, TARGET, f"k{queue[6:]}{attempt}", batch_size)
                assert run.rows_embedded == docs
                times[queue].append(seconds)
                print(f"  {queue}: {seconds:.1f} s = {docs / seconds:.2f} rows/s", flush=True)
    finally:
        settings.EMBEDDINGS = original
        for worker in started:
            worker.stop()
    one, two, oversubscribed = (docs / min(times[q]) for q in configs)
    means = {q: sum(times[q]) / len(times[q]) for q in configs}
    extra = {"seconds": times, "workers_env": {q: env for q, (_, env) in configs.items()}}
    return [
        harness.Row("backfill", f"MiniLM backfill on 2 worker processes (1 torch thread each), "
                    f"{docs} articles, batch {batch_size}", two, "rows/s",
                    "1 worker process, 2 torch threads", one, two / one, "", None,
                    {**extra, "ratio_of_means": means["bench-1w"] / means["bench-2w"]}),
        harness.Row("backfill", f"MiniLM backfill on 2 worker processes, torch default threads "
                    f"(2 each), {docs} articles, batch {batch_size}", oversubscribed, "rows/s",
                    "1 worker process, 2 torch threads", one, oversubscribed / one, "", None,
                    {"ratio_of_means": means["bench-1w"] / means["bench-2wd"]}),
    ]


def database_workers(rows: int, batch_size: int, repeat: int) -> list[harness.Row]:
    """The write path with the near-free encoder on real Celery worker processes (prefork, one
    child each, the encoder replaced in each by ``benchmarks/near_free_worker.py``): 1 process
    against 2 (the machine's 2 cores), and 2 against the hand-written COPY + UPDATE of
    ``_raw_copy_update``, a single statement on one connection. Wall clock from planning to the
    run's end; order raw, 1, 2, 2, 1, raw per repeat, each run on a freshly filled table."""
    import tempfile
    from pathlib import Path

    from django.conf import settings

    from embeddings_app import backfill, lifecycle, tasks
    from embeddings_app.models import BackfillRun
    from tests.workers import WorkerProcess, wait_for_run

    harness.use_near_free_encoder(dimensions=384)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-db-workers-"))
    env: dict[str, str | None] = {"BENCH_NEAR_FREE_DIMENSIONS": "384", "OMP_NUM_THREADS": "1"}
    configs = {"bench-db-1w": 1, "bench-db-2w": 2}  # queue -> worker processes
    started: list[WorkerProcess] = []
    original = settings.EMBEDDINGS
    counter = iter(range(10**6))

    def backfill_on(queue: str, expected_rows: int) -> tuple[float, BackfillRun]:
        settings.EMBEDDINGS = {**original, "QUEUE": queue}
        version = lifecycle.add(TARGET, f"w{next(counter)}", "tiny")
        with harness.stopwatch() as clock:
            run, ranges = backfill.start(version, batch_size=batch_size)
            tasks.dispatch(run, ranges)
            run = wait_for_run(run.pk, timeout=600, poll=0.01)
        assert run.status == BackfillRun.Status.DONE and run.rows_embedded == expected_rows, (
            run.status, run.rows_embedded, run.last_error)
        return clock["seconds"], run

    times: dict[str, list[float]] = {"raw": [], **{queue: [] for queue in configs}}
    try:
        for queue, count in configs.items():
            started += [WorkerProcess(concurrency=1, extra_env=env, queue=queue, name="bench",
                                      log_path=log_dir / f"{queue}-{n}.log", ready_timeout=120,
                                      app="benchmarks.near_free_worker")
                        for n in range(count)]
        # Warm-up, untimed: every worker process runs a batch (imports, database connection).
        warm_rows = 8 * batch_size
        for queue, count in configs.items():
            for _ in range(5):
                _fresh_table(warm_rows)
                _, run = backfill_on(queue, warm_rows)
                if len(set(run.batches.values_list("worker", flat=True))) >= count:
                    break
            else:
                raise RuntimeError(f"{queue}: not every worker process ran a warm-up batch")
        for _ in range(repeat):
            for side in ("raw", *configs, *reversed(configs), "raw"):
                _fresh_table(rows)
                seconds = (_raw_copy_update(f"wraw{next(counter)}") if side == "raw"
                           else backfill_on(side, rows)[0])
                times[side].append(seconds)
                print(f"  {side}: {seconds:.2f} s = {rows / seconds:,.0f} rows/s", flush=True)
    finally:
        settings.EMBEDDINGS = original
        for worker in started:
            worker.stop()
    raw, one, two = (rows / min(times[side]) for side in ("raw", *configs))
    measure = f"write path on 2 worker processes, near-free encoder, {rows:,} rows, batch {batch_size}"
    means = {side: sum(seconds) / len(seconds) for side, seconds in times.items()}
    extra = {"seconds": times, "ratio_of_means_to_1": means["bench-db-1w"] / means["bench-db-2w"],
             "ratio_of_means_to_raw": means["raw"] / means["bench-db-2w"]}
    return [
        harness.Row("backfill", measure, two, "rows/s", "1 worker process", one, two / one, "",
                    None, extra),
        harness.Row("backfill", measure, two, "rows/s",
                    "raw SQL: one read, one binary COPY, one UPDATE FROM (one connection)", raw,
                    two / raw, ">= 0.8x", two / raw >= 0.8, extra),
    ]


def write_strategies(rows: int, batch_size: int) -> list[harness.Row]:
    """The bulk write alone, inside one transaction per batch, same rows and vectors."""
    import numpy as np
    from django.db import connection, transaction

    from embeddings_app import registry, stores
    from embeddings_app.models import EmbeddingVersion

    field = registry.get(TARGET)
    version = EmbeddingVersion.objects.get(target=TARGET, version="naive")  # from database_bound
    pks = list(field.model.objects.order_by("pk").values_list("pk", flat=True)[:rows])
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(len(pks), version.dimensions)).astype(np.float32)
    hashes = [field.source_hash(f"text {pk}") for pk in pks]
    table, col, hcol = (stores.qn(field.table), stores.qn(version.store.vector_column),
                        stores.qn(version.store.hash_column))

    def copy_update(part: range) -> None:
        version.store.write([(pks[i], hashes[i], vectors[i]) for i in part])

    def unnest_update(part: range) -> None:
        with connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {table} AS t SET {col} = s.vec::vector, {hcol} = s.h "
                "FROM unnest(%s::bigint[], %s::text[], %s::bytea[]) AS s(pk, vec, h) "
                "WHERE t.id = s.pk",
                [[pks[i] for i in part],
                 ["[" + ",".join(map(repr, vectors[i].tolist())) + "]" for i in part],
                 [hashes[i] for i in part]])

    def per_row_update(part: range) -> None:
        with connection.cursor() as cursor:
            cursor.executemany(
                f"UPDATE {table} SET {col} = %s::vector, {hcol} = %s WHERE id = %s",
                [("[" + ",".join(map(repr, vectors[i].tolist())) + "]", hashes[i], pks[i])
                 for i in part])

    def measure(write: object) -> float:
        started = time.perf_counter()
        for start in range(0, len(pks), batch_size):
            with transaction.atomic():
                write(range(start, min(start + batch_size, len(pks))))  # type: ignore[operator]
        return len(pks) / (time.perf_counter() - started)

    for write in (copy_update, unnest_update, per_row_update):  # warm-up
        measure(write)
    rates = {name: measure(write) for name, write in
             (("copy", copy_update), ("unnest", unnest_update), ("per_row", per_row_update))}
    return [
        harness.Row("backfill", f"bulk write: COPY + UPDATE FROM, batch {batch_size}",
                    rates["copy"], "rows/s", "UPDATE FROM unnest(text[])", rates["unnest"],
                    rates["copy"] / rates["unnest"]),
        harness.Row("backfill", f"bulk write: COPY + UPDATE FROM, batch {batch_size}",
                    rates["copy"], "rows/s", "UPDATE per row (executemany)", rates["per_row"],
                    rates["copy"] / rates["per_row"]),
    ]


def main(argv: list[str] | None = None) -> list[harness.Row]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=256, help="articles for the MiniLM part")
    parser.add_argument("--batch-size", type=int, default=128,
                        help="batch size of the MiniLM part (the default BATCH_SIZE)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs of each side")
    parser.add_argument("--device", default="cpu",
                        help="EMBEDDINGS_DEVICE of this process and of its worker processes: "
                        "cpu, cuda, cuda:N or auto")
    parser.add_argument("--encode-batch-size", type=int, default=None,
                        help="EMBEDDINGS_ENCODE_BATCH_SIZE (default: the alias's for the device)")
    parser.add_argument("--alias", default="minilm", help="model alias of the encode-bound part")
    parser.add_argument("--worker-docs", type=int, default=256,
                        help="articles for 1 vs 2 workers (0 skips it)")
    parser.add_argument("--worker-batch-size", type=int, default=32)
    parser.add_argument("--worker-repeat", type=int, default=2)
    parser.add_argument("--rows", type=int, default=100_000, help="rows for the database part")
    parser.add_argument("--db-batch-sizes", type=int, nargs="+", default=[10_000, 1000],
                        help="batch sizes of the database part")
    parser.add_argument("--naive-rows", type=int, default=5000,
                        help="rows of the save() loop (a sample of --rows)")
    parser.add_argument("--write-rows", type=int, default=5000,
                        help="rows of the write-strategy comparison")
    parser.add_argument("--db-worker-batch-size", type=int, default=5000,
                        help="batch size of the database part on worker processes")
    parser.add_argument("--db-worker-repeat", type=int, default=2,
                        help="rounds (raw, 1, 2, 2, 1, raw) of the database part on workers")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["encode", "workers", "database", "db-workers", "writes"])
    args = parser.parse_args(argv)
    # As a worker started with these variables (worker processes inherit them).
    os.environ["EMBEDDINGS_DEVICE"] = args.device
    if args.encode_batch_size:
        os.environ["EMBEDDINGS_ENCODE_BATCH_SIZE"] = str(args.encode_batch_size)

    harness.setup_django()
    rows: list[harness.Row] = []
    if "encode" not in args.skip:
        rows += encode_bound(args.docs, args.batch_size, args.repeat, args.alias)
    if "workers" not in args.skip and args.worker_docs:
        rows += workers(args.worker_docs, args.worker_batch_size, args.worker_repeat)
    if "database" not in args.skip:  # replaces the encoder: runs after the MiniLM parts
        rows += database_bound(args.rows, args.db_batch_sizes, args.batch_size,
                               min(args.naive_rows, args.rows))
        if "writes" not in args.skip:
            rows += write_strategies(min(args.write_rows, args.rows), args.batch_size)
    if "db-workers" not in args.skip:  # the near-free encoder too; last, it resets the table
        rows += database_workers(args.rows, args.db_worker_batch_size, args.db_worker_repeat)
    harness.print_table(rows)
    print("machine:", harness.machine())
    for row in rows:
        if row.extra:
            print(f"{row.measure} / {row.baseline}:", row.extra)
    print("results:", harness.write_json("backfill", rows, vars(args)))
    return rows


if __name__ == "__main__":
    main()
