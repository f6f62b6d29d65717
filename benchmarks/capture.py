"""Change capture (docs/backfill.md, "Change capture"), against baselines of the same run:

* UPDATE time of ``--updates`` source-column updates with the capture trigger against without
  it (target <= 1.1x), two ways: one statement per row (psycopg pipelined ``executemany``,
  commits every 1,000, as an application or a sync job writes) and one bulk statement;
* the same count of updates of a non-source column (target <= 1.02x): the trigger's column list
  keeps it from firing at all;
* making ``--changed`` rows changed behind the app's back fresh among ``--rows``: one drain of
  the change queue against the full-scan sweep (``sync_queryset``, the sweep before change
  capture) (target >= 50x faster).

Each pair runs its two sides ``--repeat`` times, alternating which goes first (a VACUUM of the
table before each timing), and compares the medians. The encoder is replaced by a table lookup
(``use_near_free_encoder``): both sides of the drain comparison encode the same rows, so the
figure is what finding them costs.
Run: ``python -m benchmarks.capture [--rows N] [--updates N] [--changed N]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import psycopg

from benchmarks import harness

TARGET = "news.Article.embedding"


def main(argv: list[str] | None = None) -> list[harness.Row]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--updates", type=int, default=100_000)
    parser.add_argument("--changed", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--layout", choices=("column", "table"), default="table")
    args = parser.parse_args(argv)
    if args.updates > args.rows or args.changed > args.rows:
        parser.error("--updates and --changed must not exceed --rows")

    harness.setup_django()
    harness.use_near_free_encoder(dimensions=32)
    from django.db import connection

    from embeddings_app import backfill, capture, lifecycle, registry, stores, sync

    field = registry.get(TARGET)
    change_queue = stores.ChangeQueue(field)
    harness.reset_articles()
    with harness.stopwatch() as load:
        harness.insert_articles(args.rows)
        version = lifecycle.add(TARGET, "v1", "tiny", layout=args.layout)  # installs the trigger
        run, ranges = backfill.start(version, batch_size=10_000, mode="inline")
        backfill.run_inline(run, ranges)
    print(f"loaded {args.rows:,} rows and backfilled them in {load['seconds']:.0f} s", flush=True)
    assert change_queue.installed() and change_queue.stats()[0] == 0

    with connection.cursor() as cursor:
        cursor.execute("SELECT min(id) FROM news_article")
        (first_id,) = cursor.fetchone()
    ids = list(range(first_id, first_id + args.updates))
    counter = iter(range(10**9))

    conf = connection.settings_dict
    # The writes timed come from a client of their own, as an application's would.
    writer = psycopg.connect(dbname=conf["NAME"], user=conf["USER"], host=conf["HOST"] or None,
                             port=conf["PORT"] or None, password=conf["PASSWORD"] or None)

    def vacuum() -> None:
        with connection.cursor() as cursor:
            if change_queue.installed():
                cursor.execute(f"TRUNCATE {stores.qn(change_queue.queue)}")
            cursor.execute("VACUUM (ANALYZE) news_article")

    def timed(statements: Callable[[Any], None]) -> float:
        vacuum()
        started = time.perf_counter()
        with writer.cursor() as cursor:
            statements(cursor)
        writer.commit()
        return time.perf_counter() - started

    def per_row(column: str) -> Callable[[Any], None]:
        def run_statements(cursor: Any) -> None:
            tag = next(counter)
            for start in range(0, len(ids), 1000):
                chunk = ids[start:start + 1000]
                cursor.executemany(f"UPDATE news_article SET {column} = %s WHERE id = %s",
                                   [(f"edit {tag} of {pk}", pk) for pk in chunk])
                writer.commit()
        return run_statements

    def bulk(column: str) -> Callable[[Any], None]:
        def run_statement(cursor: Any) -> None:
            cursor.execute(f"UPDATE news_article SET {column} = %s || id::text "
                           "WHERE id BETWEEN %s AND %s", [f"bulk {next(counter)} ", ids[0], ids[-1]])
        return run_statement

    def with_and_without(statements: Callable[[Any], None]) -> tuple[float, float, int]:
        """(median seconds with the trigger, without it, entries one run with it queued)."""
        on, off, queued = [], [], 0
        for round_number in range(args.repeat):
            # Alternating which side goes first: neither always meets the other's leftovers.
            for with_trigger in ((False, True) if round_number % 2 == 0 else (True, False)):
                if with_trigger:
                    change_queue.install()
                    on.append(timed(statements))
                    queued = change_queue.stats()[0]
                else:
                    change_queue.remove()
                    off.append(timed(statements))
        change_queue.install()
        return statistics.median(on), statistics.median(off), queued

    rows: list[harness.Row] = []
    cases = [("source updates, one statement per row", per_row("title"), 1.1, args.updates),
             ("source updates, one bulk statement", bulk("title"), 1.1, args.updates),
             ("non-source updates, one statement per row", per_row("category"), 1.02, 0),
             ("non-source updates, one bulk statement", bulk("category"), 1.02, 0)]
    for measure, statements, target, expected_queued in cases:
        on, off, queued = with_and_without(statements)
        assert queued == expected_queued, f"{measure}: {queued} entries queued"
        ratio = on / off
        rows.append(harness.Row("capture", f"{args.updates:,} {measure}", on, "s",
                                "without the trigger", off, ratio, f"<= {target}x",
                                ratio <= target, {"queued": queued}))
        print(f"{measure}: {on:.2f} s with the trigger, {off:.2f} s without ({ratio:.3f}x)",
              flush=True)

    # --- drain against full scan ---------------------------------------------------------------
    assert change_queue.installed()
    with harness.stopwatch() as refresh:  # the updates above changed rows: all fresh again
        sync.sync_queryset(field, page_size=10_000)
    print(f"refreshed the rows the updates changed in {refresh['seconds']:.0f} s", flush=True)
    import random

    changed_ids = random.Random(0).sample(range(first_id, first_id + args.rows), args.changed)

    def change() -> None:
        with connection.cursor() as cursor:
            cursor.execute(f"TRUNCATE {stores.qn(change_queue.queue)}")
            cursor.execute("UPDATE news_article SET title = %s || id::text WHERE id = ANY(%s)",
                           [f"changed {next(counter)} ", changed_ids])
            cursor.execute("VACUUM (ANALYZE) news_article")

    drains, scans = [], []
    for _ in range(args.repeat):
        change()
        assert change_queue.stats()[0] == args.changed
        started = time.perf_counter()
        stats = capture.drain(field, batch_size=1000)
        drains.append(time.perf_counter() - started)
        assert (stats.entries, stats.written) == (args.changed, args.changed), stats.as_dict()
        change()
        started = time.perf_counter()
        written = sync.sync_queryset(field, page_size=1000)
        scans.append(time.perf_counter() - started)
        assert written == args.changed, written
    drain_s, scan_s = statistics.median(drains), statistics.median(scans)
    ratio = scan_s / drain_s
    rows.append(harness.Row("capture", f"{args.changed:,} changed among {args.rows:,}: drain",
                            drain_s, "s", "full-scan sweep", scan_s, ratio, ">= 50x faster",
                            ratio >= 50, {"drains_s": drains, "scans_s": scans}))
    print(f"drain {drain_s:.3f} s, full scan {scan_s:.2f} s ({ratio:.0f}x)", flush=True)

    writer.close()
    harness.print_table(rows)
    print("results:", harness.write_json("capture", rows, vars(args)))
    return rows


if __name__ == "__main__":
    main()
