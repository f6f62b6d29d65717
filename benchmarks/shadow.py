"""Shadow reads: the latency a user sees from ``search()`` with shadow reads at R = 0.1 and
R = 1.0, against shadow reads off, on the same queries in the same run (issue 16's target:
<= 1.05x at R = 0.1, p50 and p95).

As deployed: the active v1 and the candidate v2 are real MiniLM versions (v1 in a column, v2 in
a side table, the layout migration a user would shadow) over the same real sentences; a real
Celery worker (one process) answers the shadow reads while the searches run, on the same two
cores. ``--rounds`` x ``--queries`` distinct real sentences, in blocks of ``--block``: every
mode searches each block's sentences (the query cache cleared before each mode's turn, so the
serving side pays a real encode every time), the modes in a rotating order; the worker finishes
a block's shadow reads before the next mode's turn. A block lasts more than the publisher's
interval (``shadow.PUBLISH_INTERVAL``: 100 searches take about 1.5 s), so batches are published
while searches are timed; many blocks per mode (``--rounds``) spread the machine's drifts (seen:
a mode's median moving by 15% between runs of 6 blocks) over the modes alike.

Run: ``python -m benchmarks.shadow [--rows N] [--queries N] [--rounds N]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks import harness

TARGET = "news.Article.embedding"
MODES = (0.0, 0.1, 1.0)


def main(argv: list[str] | None = None) -> list[harness.Row]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=100, help="distinct sentences per block")
    parser.add_argument("--rounds", type=int, default=4,
                        help="rounds of --queries distinct sentences, each searched in every mode")
    parser.add_argument("--block", type=int, default=100,
                        help="searches per block: each mode searches the sentences in blocks of "
                        "this many, the modes' blocks alternating; a block must last a few "
                        "publish intervals (shadow.PUBLISH_INTERVAL), so that the batches are "
                        "published while searches are timed, as in a steady stream")
    parser.add_argument("--worker", choices=("beside", "after"), default="after",
                        help="beside: the worker answers the shadow reads while the searches "
                        "run, on the same cores; after: it stops consuming during each block and "
                        "catches up after it (a worker on other machines, as usually deployed): "
                        "what the request path itself pays")
    args = parser.parse_args(argv)

    harness.setup_django()
    from celery.signals import before_task_publish
    from django.db import connection, transaction

    from embeddings_app import active, encoders, indexes, lifecycle, registry, shadow
    from embeddings_app.config import get_config
    from embeddings_app.models import EmbeddingVersion, ShadowBucket, State
    from project.news.models import Article
    from tests.workers import WorkerProcess

    harness.reset_articles()
    sentences = harness.real_sentences(2_000 + args.queries * args.rounds)
    table_sentences, query_sentences = sentences[:2_000], sentences[2_000:]
    minilm = encoders.load(get_config().model("minilm"))
    print(f"encoding {len(table_sentences)} real sentences with MiniLM ...", flush=True)
    base = minilm.encode_documents(table_sentences)
    vectors = harness.spread_vectors(base, args.rows, noise=0.35)
    texts = [f"{table_sentences[i % len(table_sentences)]} #{i}" for i in range(args.rows)]

    lifecycle.add(TARGET, "v1", "minilm", layout="column")
    lifecycle.add(TARGET, "v2", "minilm", layout="table")
    print(f"loading {args.rows} rows into v1 and v2 ...", flush=True)
    harness.load_precomputed("v1", texts, vectors)
    field = registry.get(TARGET)
    v2 = EmbeddingVersion.objects.get(target=TARGET, version="v2")
    articles = list(Article.objects.order_by("pk"))
    for start in range(0, len(articles), 5_000):
        part = articles[start:start + 5_000]
        with transaction.atomic():
            v2.store.write([(a.pk, field.source_hash(field.source_text(a)), vectors[start + i])
                            for i, a in enumerate(part)])
    for name in ("v1", "v2"):
        version = EmbeddingVersion.objects.get(target=TARGET, version=name)
        lifecycle.transition(version, State.READY, note="benchmark data")
        indexes.build(version)
    lifecycle.activate(TARGET, "v1", force=True)  # reads are measured, not the cutover rules
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")

    worker = WorkerProcess(concurrency=1, name="bench-shadow")
    from project.celery import app as celery_app

    queue_name = get_config().queue

    def consuming(on: bool) -> None:
        if args.worker == "after":
            if on:
                celery_app.control.add_consumer(queue_name, reply=True, timeout=10, limit=1)
            else:
                celery_app.control.cancel_consumer(queue_name, reply=True, timeout=10, limit=1)
    samples: dict[float, list[float]] = {mode: [] for mode in MODES}
    block_p50s: dict[float, list[float]] = {mode: [] for mode in MODES}
    published: list[str] = []

    def count(sender: str | None = None, body: tuple | None = None, **_: object) -> None:
        if sender == "embeddings_app.shadow_reads":  # a batch: one sample per sampled search
            published.extend(body[0][0] if body else ())

    before_task_publish.connect(count, weak=False)
    try:
        blocks = [query_sentences[start:start + args.block]
                  for start in range(0, args.queries * args.rounds, args.block)]
        for number, block in enumerate(blocks):
            shift = number % len(MODES)
            # Every mode searches the same sentences (the query cache is cleared before each
            # block, so each pays the encode): the modes differ only in shadowing.
            for mode in MODES[shift:] + MODES[:shift]:
                if mode:
                    shadow.start(TARGET, "v2", mode)
                else:
                    shadow.stop(TARGET)
                active.invalidate()
                minilm_version = EmbeddingVersion.objects.get(target=TARGET, version="v1")
                encoders.for_version(minilm_version).clear_query_cache()
                consuming(False)
                times = []
                for text in block:
                    started = time.perf_counter()
                    Article.embedding.search(text, k=10)
                    times.append(time.perf_counter() - started)
                samples[mode].extend(times)
                block_p50s[mode].append(statistics.median(times) * 1000)
                # The worker catches up before the mode changes (a task delivered after its
                # shadowing stopped records nothing), so each block bears its own mode's work.
                shadow.flush(60)  # the process's publisher thread has sent the block's tasks
                consuming(True)
                deadline = time.monotonic() + 600
                while shadow.summary(v2).queries < len(published) and time.monotonic() < deadline:
                    time.sleep(0.5)
    finally:
        shadow.stop(TARGET)
        worker.stop()

    rows: list[harness.Row] = []
    off = harness.latency_summary(samples[0.0])
    for mode in MODES[1:]:
        on = harness.latency_summary(samples[mode])
        for stat in ("p50_ms", "p95_ms"):
            ratio = on[stat] / off[stat]
            target = "<= 1.05x" if mode == 0.1 else ""
            rows.append(harness.Row(
                "shadow", f"search() with shadow reads at R = {mode} {stat[:3]} (worker {args.worker})",
                on[stat], "ms",
                "shadow reads off", off[stat], ratio, target,
                (ratio <= 1.05) if mode == 0.1 else None,
                {"searches": len(samples[mode]), "blocks": len(block_p50s[mode]),
                 "block_p50_ms_range": [round(min(block_p50s[mode]), 2),
                                        round(max(block_p50s[mode]), 2)],
                 "off_block_p50_ms_range": [round(min(block_p50s[0.0]), 2),
                                            round(max(block_p50s[0.0]), 2)]}))
    summary = shadow.summary(v2)
    rows.append(harness.Row(
        "shadow", "shadow reads recorded by the worker", float(summary.queries), "queries",
        "tasks published", float(len(published)), summary.queries / max(len(published), 1), "",
        None, {"mean_overlap": summary.mean_overlap, "unranked": summary.unranked_rows,
               "buckets": ShadowBucket.objects.filter(version=v2).count()}))
    harness.print_table(rows)
    print(f"mean overlap@10 of v2 (same model, another layout) with v1: {summary.mean_overlap}")
    print("results:", harness.write_json("shadow" if args.worker == "after" else "shadow-beside", rows,
                                         {"rows": args.rows, "queries": args.queries,
                                          "rounds": args.rounds, "block": args.block,
                                          "worker": args.worker}))
    return rows


if __name__ == "__main__":
    main()
