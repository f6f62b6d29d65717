"""Memory: peak RSS of a backfill worker process at 20,000 and at 200,000 rows, near-free
encoder. A streaming backfill holds nothing proportional to the table: the two should match.

Run: ``python -m benchmarks.memory [--sizes 20000 200000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from benchmarks import harness

TARGET = "news.Article.embedding"


def worker(rows: int) -> None:
    """The measured process: one whole inline backfill of ``rows`` rows (made beforehand)."""
    import resource

    harness.setup_django()
    harness.use_near_free_encoder()
    from embeddings_app import backfill
    from embeddings_app.models import EmbeddingVersion

    version = EmbeddingVersion.objects.get(target=TARGET, version="v1")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run, ranges = backfill.start(version, mode="inline")
    backfill.run_inline(run, ranges)
    run.refresh_from_db()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rows": rows, "rss_before_kib": before, "peak_rss_kib": peak,
                      "embedded": run.rows_embedded, "status": run.status}))


def prepare(rows: int) -> None:
    harness.setup_django()
    from embeddings_app import lifecycle

    harness.reset_articles()
    harness.insert_articles(rows)
    lifecycle.add(TARGET, "v1", "tiny")


def main(argv: list[str] | None = None) -> list[harness.Row]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs=2, default=[20_000, 200_000])
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--prepare", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return []
    if args.prepare:
        prepare(args.prepare)
        return []

    measured = {}
    for rows in args.sizes:
        for step in ("--prepare", "--worker"):
            result = subprocess.run([sys.executable, "-m", "benchmarks.memory", step, str(rows)],
                                    capture_output=True, text=True, env=os.environ, check=True)
        measured[rows] = json.loads(result.stdout.strip().splitlines()[-1])
        assert measured[rows]["embedded"] == rows, measured[rows]
    small, large = (measured[n] for n in args.sizes)
    ratio = large["peak_rss_kib"] / small["peak_rss_kib"]
    rows_out = [harness.Row(
        "memory", f"backfill worker peak RSS at {args.sizes[1]:,} rows",
        large["peak_rss_kib"] / 1024, "MiB", f"at {args.sizes[0]:,} rows",
        small["peak_rss_kib"] / 1024, ratio, "within 10%", abs(ratio - 1) <= 0.10,
        extra={"measured": measured},
    )]
    harness.print_table(rows_out)
    print("results:", harness.write_json("memory", rows_out))
    return rows_out


if __name__ == "__main__":
    main()
