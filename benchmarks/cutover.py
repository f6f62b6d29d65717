"""Cutover: read latency p50/p99 and failed reads of 4 concurrent readers in the second before,
during and after ``activate`` (and the same around ``rollback``).

Run: ``python -m benchmarks.cutover [--docs N]``.
"""

from __future__ import annotations

import argparse
import threading
import time

from benchmarks import harness

TARGET = "news.Article.embedding"
QUERIES = ["interest rates and the economy", "new mobile phone launch", "general election result",
           "championship final", "film awards ceremony", "software security flaw"]


def main(argv: list[str] | None = None) -> list[harness.Row]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--docs", type=int, default=500)
    parser.add_argument("--readers", type=int, default=4)
    args = parser.parse_args(argv)

    harness.setup_django()
    from django.core.management import call_command
    from django.db import connection

    from project.news.models import Article

    harness.reset_articles()
    harness.insert_corpus_articles(args.docs)
    for version, alias in (("v1", "minilm"), ("v2", "minilm256")):
        call_command("embeddings", "add", TARGET, version, "--model", alias)
        call_command("embeddings", "backfill", TARGET, version, "--inline")
        call_command("embeddings", "index", TARGET, version)
        call_command("embeddings", "verify", TARGET, version)
    call_command("embeddings", "activate", TARGET, "v1")

    events: list[tuple[float, float, bool, str]] = []  # (start, latency, ok, version)
    stop = threading.Event()
    lock = threading.Lock()

    def reader(offset: int) -> None:
        i = offset
        try:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    results = Article.embedding.search(QUERIES[i % len(QUERIES)], k=10)
                    ok = len(results) == 10
                    version = getattr(results[0], "embedding_version", "?") if results else "?"
                except Exception:  # a failed read is what this benchmark counts
                    ok, version = False, "error"
                with lock:
                    events.append((started, time.perf_counter() - started, ok, version))
                i += 1
        finally:
            connection.close()

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(args.readers)]
    for thread in threads:
        thread.start()
    time.sleep(3)  # readers warm
    flips = {}
    for name, command in (("activate", ["activate", TARGET, "v2"]), ("rollback", ["rollback", TARGET])):
        started = time.perf_counter()
        call_command("embeddings", *command)
        flips[name] = (started, time.perf_counter())
        time.sleep(2)
    stop.set()
    for thread in threads:
        thread.join()

    rows = []
    for name, (begin, end) in flips.items():
        windows = {"before": (begin - 1, begin), "during": (begin, end), "after": (end, end + 1)}
        base = None
        for label, (lo, hi) in windows.items():
            sample = [e for e in events if lo <= e[0] < hi]
            latencies = [e[1] for e in sample if e[2]]
            failed = sum(1 for e in sample if not e[2])
            summary = harness.latency_summary(latencies)
            if label == "before":
                base = summary
            for stat in ("p50_ms", "p99_ms"):
                rows.append(harness.Row(
                    "cutover", f"{name} {label}: read {stat[:3]}", summary[stat], "ms",
                    "1 s before", base[stat] if base else None,
                    summary[stat] / base[stat] if base and base[stat] else None,
                    extra={"reads": summary["n"], "failed": failed},
                ))
            rows.append(harness.Row("cutover", f"{name} {label}: failed reads", failed, "reads",
                                    target="0", met=failed == 0,
                                    extra={"reads": len(sample), "flip_ms": (end - begin) * 1000}))
    harness.print_table(rows)
    print("results:", harness.write_json("cutover", rows, {"docs": args.docs}))
    return rows


if __name__ == "__main__":
    main()
