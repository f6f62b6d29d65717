"""Change capture (docs/backfill.md, "Change capture"), against baselines of the same run, for
each capture mode of ``EMBEDDINGS["CHANGE_CAPTURE"]`` (``--capture``, default both):

* ``trigger`` (``stores.ChangeQueue``): UPDATE time of ``--updates`` source-column updates with
  the capture trigger against without it (target <= 1.1x), two ways: one statement per row
  (psycopg pipelined ``executemany``, commits every 1,000, as an application or a sync job
  writes) and one bulk statement; the same count of updates of a non-source column (target
  <= 1.02x): the trigger's column list keeps it from firing at all. Each pair runs its two sides
  ``--repeat`` times, alternating which goes first (a VACUUM of the table before each timing),
  and compares the medians.
* ``logical`` (``stores.LogicalChangeQueue``: a replication slot read with ``pgoutput`` and the
  publication ``embeddings_capture``): the same updates, three sides: logical capture installed
  on a server with ``wal_level = logical``; no capture on the same server; no capture on a
  server with ``wal_level = replica``, the level a server without logical capture may run with.
  The embedded server is restarted before *every* timing of every side (``ALTER SYSTEM`` +
  ``pg_ctl restart``; logical restored at the end), so the three see the same cold start; the
  order rotates each round, and the medians give three ratios: the capture's own (against no
  capture on the same logical server), ``wal_level = logical``'s own (no capture on both), and
  **what a user pays**: logical capture on a logical server against no capture on a replica
  server. The slot is created right before the timed writes and not read while they run (the
  collect happens in the drain): what a user's writes pay while it keeps WAL. pgoutput sends an
  update of any column, so the slot holds ``--updates`` changes after the non-source updates too
  (the collect reads them and finds the rows fresh); the count is printed. Without the embedded
  server (``DATABASE_URL`` set) nothing is restarted and the replica side is left out.
* For both modes, WAL bytes per update (``pg_current_wal_insert_lsn`` before and after, medians).
* Making ``--changed`` rows changed behind the app's back fresh among ``--rows``: one
  ``capture.drain`` (for ``logical``, that includes the collect that reads the slot: its own
  time and the WAL it had to decode are printed too) against the full-scan sweep
  (``sync_queryset``, the sweep before change capture) (target >= 50x faster), ``--repeat``
  times each, alternating, medians. The queue (or the slot) is emptied before each change.

The encoder is replaced by a table lookup (``use_near_free_encoder``): both sides of the drain
comparison encode the same rows, so the figure is what finding them costs.
Run: ``python -m benchmarks.capture [--rows N] [--updates N] [--changed N] [--repeat N]
[--capture trigger|logical|both]``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import psycopg

from benchmarks import harness

TARGET = "news.Article.embedding"
SETTING = {"trigger": True, "logical": "logical"}  # --capture mode: EMBEDDINGS["CHANGE_CAPTURE"]


def main(argv: list[str] | None = None) -> list[harness.Row]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--updates", type=int, default=100_000)
    parser.add_argument("--changed", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--layout", choices=("column", "table"), default="table")
    parser.add_argument("--capture", choices=("trigger", "logical", "both"), default="both")
    parser.add_argument("--only", choices=("updates", "drain"), default=None,
                        help="run one of the two sections (default both)")
    args = parser.parse_args(argv)
    if args.updates > args.rows or args.changed > args.rows:
        parser.error("--updates and --changed must not exceed --rows")
    modes = tuple(SETTING) if args.capture == "both" else (args.capture,)

    harness.setup_django()
    harness.use_near_free_encoder(dimensions=32)
    from django.conf import settings
    from django.db import connection

    from embeddings_app import backfill, capture, lifecycle, registry, stores, sync
    from project import services

    field = registry.get(TARGET)
    embedded = services._handles.get("postgres") is not None

    def use(mode: str) -> Any:
        """The setting for ``mode``, the other mode's capture removed, this one's installed:
        its queue."""
        settings.EMBEDDINGS = {**settings.EMBEDDINGS, "CHANGE_CAPTURE": SETTING[mode]}
        for other in modes:
            if other != mode:
                queue_of(other).remove()
        queue = capture.queue(field)
        assert queue is not None and type(queue) is type(queue_of(mode)), queue
        install(queue)
        return queue

    def install(queue: Any) -> None:
        capture.prepare(field)  # the logical capture's slot and publication, if missing
        queue.install()

    def queue_of(mode: str) -> Any:
        return stores.ChangeQueue(field) if mode == "trigger" else stores.LogicalChangeQueue(field)

    def sql(statement: str, params: list[Any] | None = None) -> Any:
        with connection.cursor() as cursor:
            cursor.execute(statement, params)
            return cursor.fetchone() if cursor.description else None

    conf = connection.settings_dict
    writer: list[psycopg.Connection] = []  # the client of the timed writes (reopened on restart)

    def connect_writer() -> None:
        # The writes timed come from a client of their own, as an application's would.
        writer[:] = [psycopg.connect(dbname=conf["NAME"], user=conf["USER"],
                                     host=conf["HOST"] or None, port=conf["PORT"] or None,
                                     password=conf["PASSWORD"] or None)]

    def restart(level: str) -> None:
        """The embedded server restarted with ``wal_level = level`` (logical: the setting of its
        postgresql.conf, services.py)."""
        if level == "logical":
            sql("ALTER SYSTEM RESET wal_level")
        else:
            assert level == "replica"
            (slots,) = sql("SELECT string_agg(format('%%s (database %%s)', slot_name, database), "
                           "', ') FROM pg_replication_slots WHERE slot_type = 'logical'")
            if slots:  # PostgreSQL would not start: it refuses a logical slot below logical
                raise RuntimeError(f"cannot restart with wal_level = {level}: logical "
                                   f"replication slots exist: {slots}")
            sql(f"ALTER SYSTEM SET wal_level = {level}")
        writer[0].close()
        connection.close()
        services.restart_postgres()
        connect_writer()
        (running,) = sql("SHOW wal_level")
        assert running == level, (running, level)

    if "logical" in modes and embedded and sql("SHOW wal_level")[0] != "logical":
        connect_writer()
        restart("logical")  # e.g. a run stopped while on replica

    settings.EMBEDDINGS = {**settings.EMBEDDINGS, "CHANGE_CAPTURE": SETTING[modes[0]]}
    for mode in modes:
        queue_of(mode).remove()
    harness.reset_articles()
    with harness.stopwatch() as load:
        harness.insert_articles(args.rows)
        # Installs the first mode's capture.
        version = lifecycle.add(TARGET, "v1", "tiny", layout=args.layout)
        run, ranges = backfill.start(version, batch_size=10_000, mode="inline")
        backfill.run_inline(run, ranges)
    print(f"loaded {args.rows:,} rows and backfilled them in {load['seconds']:.0f} s "
          f"(load average {harness.load_average()})", flush=True)

    (first_id,) = sql("SELECT min(id) FROM news_article")
    ids = list(range(first_id, first_id + args.updates))
    changed_ids = random.Random(0).sample(range(first_id, first_id + args.rows), args.changed)
    counter = iter(range(10**9))
    if not writer:
        connect_writer()

    def timed(statements: Callable[[Any], None], before: Callable[[], None]) -> tuple[float, int]:
        """(seconds, WAL bytes) of ``statements`` on the writer, after ``before`` and a VACUUM."""
        before()
        sql("VACUUM (ANALYZE) news_article")
        (start_lsn,) = sql("SELECT pg_current_wal_insert_lsn()")
        started = time.perf_counter()
        with writer[0].cursor() as cursor:
            statements(cursor)
        writer[0].commit()
        seconds = time.perf_counter() - started
        (wal,) = sql("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s)", [start_lsn])
        return seconds, int(wal)

    def per_row(column: str) -> Callable[[Any], None]:
        def run_statements(cursor: Any) -> None:
            tag = next(counter)
            for start in range(0, len(ids), 1000):
                chunk = ids[start:start + 1000]
                cursor.executemany(f"UPDATE news_article SET {column} = %s WHERE id = %s",
                                   [(f"edit {tag} of {pk}", pk) for pk in chunk])
                writer[0].commit()
        return run_statements

    def bulk(column: str) -> Callable[[Any], None]:
        def run_statement(cursor: Any) -> None:
            cursor.execute(f"UPDATE news_article SET {column} = %s || id::text "
                           "WHERE id BETWEEN %s AND %s", [f"bulk {next(counter)} ", ids[0], ids[-1]])
        return run_statement

    def rotated(sides: dict[str, Callable[[], None]], statements: Callable[[Any], None],
                after: dict[str, Callable[[], Any]]) -> dict[str, dict[str, Any]]:
        """Each side's timing (its ``sides`` set-up first), ``--repeat`` rounds, the order
        rotating each round (two sides: alternating which goes first), so no side always meets
        another's leftovers. Per side: median seconds, median WAL bytes, and what ``after`` (if
        any) returned after its last timing."""
        names = list(sides)
        seconds: dict[str, list[float]] = {name: [] for name in names}
        wal: dict[str, list[int]] = {name: [] for name in names}
        found: dict[str, Any] = {}
        for round_number in range(args.repeat):
            shift = round_number % len(names)
            for name in names[shift:] + names[:shift]:
                took, written = timed(statements, sides[name])
                seconds[name].append(took)
                wal[name].append(written)
                if name in after:
                    found[name] = after[name]()
        return {name: {"s": statistics.median(seconds[name]), "samples_s": seconds[name],
                       "wal_bytes": statistics.median(wal[name]), "after": found.get(name)}
                for name in names}

    cases = [("source updates, one statement per row", per_row("title"), 1.1, True),
             ("source updates, one bulk statement", bulk("title"), 1.1, True),
             ("non-source updates, one statement per row", per_row("category"), 1.02, False),
             ("non-source updates, one bulk statement", bulk("category"), 1.02, False)]
    rows: list[harness.Row] = []

    def per_update(wal_bytes: float) -> float:
        return wal_bytes / args.updates

    # --- trigger: updates with and without it ---------------------------------------------------
    def trigger_updates(queue: Any) -> None:
        def truncate() -> None:
            if queue.installed():
                sql(f"TRUNCATE {stores.qn(queue.queue)}")

        sides = {"without the trigger": lambda: (queue.remove(), truncate()),
                 "with the trigger": lambda: (queue.install(), truncate())}
        for measure, statements, target, source in cases:
            result = rotated(sides, statements, {"with the trigger": lambda: queue.stats()[0]})
            queue.install()
            on, off = result["with the trigger"], result["without the trigger"]
            queued = on["after"]
            assert queued == (args.updates if source else 0), f"{measure}: {queued} queued"
            ratio = on["s"] / off["s"]
            rows.append(harness.Row(
                "capture", f"{args.updates:,} {measure}: trigger", on["s"], "s",
                "without the trigger", off["s"], ratio, f"<= {target}x", ratio <= target,
                {"queued": queued, "wal_bytes_per_update": per_update(on["wal_bytes"]),
                 "baseline_wal_bytes_per_update": per_update(off["wal_bytes"]),
                 "samples_s": on["samples_s"], "baseline_samples_s": off["samples_s"]}))
            print(f"trigger, {measure}: {on['s']:.2f} s with the trigger, {off['s']:.2f} s "
                  f"without ({ratio:.3f}x); WAL {per_update(on['wal_bytes']):.0f} / "
                  f"{per_update(off['wal_bytes']):.0f} bytes per update", flush=True)

    # --- logical: updates with it, without it, and without it on a replica server ---------------
    def slot_changes() -> int:
        """Updates of the article table waiting in the slot (pgoutput 'U' messages), after a
        timing: peeked, not consumed (it decodes them all: not timed)."""
        slot = stores.CaptureSlot()
        (count,) = sql("SELECT count(*) FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, "
                       "'proto_version', '1', 'publication_names', %s) "
                       "WHERE get_byte(data, 0) = ascii('U')", [slot.name, slot.publication])
        return int(count)

    def logical_updates(queue: Any) -> None:
        capture_side, logical_side, replica_side = (
            "logical capture, wal_level=logical", "no capture, wal_level=logical",
            "no capture, wal_level=replica")

        def side(level: str, installed: bool) -> Callable[[], None]:
            def set_up() -> None:
                queue.remove()  # before a replica start: a logical slot would stop it
                if embedded:
                    restart(level)
                if installed:
                    install(queue)  # a new slot: nothing in it yet, and nobody reads it
            return set_up

        sides = {capture_side: side("logical", True), logical_side: side("logical", False)}
        if embedded:
            sides[replica_side] = side("replica", False)
        else:
            print("not the embedded server: no restarts, and no wal_level = replica side",
                  flush=True)
        try:
            for measure, statements, target, _source in cases:
                result = rotated(sides, statements, {capture_side: slot_changes})
                on, off = result[capture_side], result[logical_side]
                in_slot = on["after"]
                assert in_slot == args.updates, f"{measure}: {in_slot} changes in the slot"
                ratio = on["s"] / off["s"]
                wal = {name: per_update(value["wal_bytes"]) for name, value in result.items()}
                extra = {"changes_in_slot": in_slot, "wal_bytes_per_update": wal,
                         "samples_s": {name: value["samples_s"] for name, value in result.items()}}
                rows.append(harness.Row(
                    "capture", f"{args.updates:,} {measure}: logical capture", on["s"], "s",
                    "no capture (both wal_level=logical)", off["s"], ratio, f"<= {target}x",
                    ratio <= target, extra))
                line = (f"logical, {measure}: {on['s']:.2f} s with logical capture, "
                        f"{off['s']:.2f} s without ({ratio:.3f}x)")
                if replica_side in result:
                    replica = result[replica_side]
                    level_ratio, paid = off["s"] / replica["s"], on["s"] / replica["s"]
                    rows.append(harness.Row(
                        "capture", f"{args.updates:,} {measure}: wal_level=logical, no capture",
                        off["s"], "s", "wal_level=replica, no capture", replica["s"],
                        level_ratio, "", None, extra))
                    rows.append(harness.Row(
                        "capture", f"{args.updates:,} {measure}: logical capture on a logical "
                        "server (what a user pays)", on["s"], "s",
                        "no capture on a replica server", replica["s"], paid, f"<= {target}x",
                        paid <= target, extra))
                    line += (f"; {replica['s']:.2f} s without on wal_level=replica: "
                             f"wal_level=logical {level_ratio:.3f}x, capture + logical "
                             f"{paid:.3f}x")
                wal_text = ", ".join(f"{name} {value:.0f}" for name, value in wal.items())
                print(f"{line}; {in_slot:,} changes in the slot; WAL bytes per update: "
                      f"{wal_text}", flush=True)
        finally:
            if embedded and sql("SHOW wal_level")[0] != "logical":
                restart("logical")
            install(queue)

    # --- drain against full scan ----------------------------------------------------------------
    def drain_against_scan(mode: str, queue: Any) -> None:
        assert queue.installed()
        with harness.stopwatch() as refresh:  # the updates above changed rows: all fresh again
            sync.sync_queryset(field, page_size=10_000)
        print(f"refreshed the rows the updates changed in {refresh['seconds']:.0f} s", flush=True)

        def change() -> None:
            # VACUUM first, then the change: a VACUUM (ANALYZE) between the change and the drain
            # puts catalog updates into the log the logical collect decodes (measured: 28 to 45 ms
            # for each of its two reads of 1,000 changes, against 1 to 9 ms without), which is
            # not the change being measured.
            sql("VACUUM (ANALYZE) news_article")
            if mode == "logical":  # the slot read up to here, as a drain leaves it
                (original_collect or capture.collect)()
            sql(f"TRUNCATE {stores.qn(queue.queue)}")
            sql("UPDATE news_article SET title = %s || id::text WHERE id = ANY(%s)",
                [f"changed {next(counter)} ", changed_ids])

        collects: list[float] = []
        original_collect = getattr(capture, "collect", None)

        def timed_collect(*args_: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original_collect(*args_, **kwargs)
            finally:
                collects.append(time.perf_counter() - started)

        drains, scans, decoded, collected = [], [], [], []
        if mode == "logical":
            capture.collect = timed_collect  # drain calls it first: its share of the drain
        try:
            for _ in range(args.repeat):
                change()
                if mode == "trigger":
                    assert queue.stats()[0] == args.changed
                else:  # the WAL the collect will read: the changes and all else since
                    decoded.append(stores.CaptureSlot().backlog())
                started = time.perf_counter()
                stats = capture.drain(field, batch_size=1000)
                drains.append(time.perf_counter() - started)
                if mode == "logical":
                    collected.append(stats.collected.changes)
                # Every changed row written once: from the queue, or (the log, one batch or
                # fewer) by the collect itself.
                assert stats.written == args.changed, stats.as_dict()
                assert mode == "logical" or stats.entries == args.changed, stats.as_dict()
                change()
                started = time.perf_counter()
                written = sync.sync_queryset(field, page_size=1000)
                scans.append(time.perf_counter() - started)
                assert written == args.changed, written
        finally:
            if original_collect is not None:
                capture.collect = original_collect
        drain_s, scan_s = statistics.median(drains), statistics.median(scans)
        ratio = scan_s / drain_s
        extra: dict[str, Any] = {"drains_s": drains, "scans_s": scans}
        line = f"{mode}: drain {drain_s:.3f} s, full scan {scan_s:.2f} s ({ratio:.0f}x)"
        if mode == "logical":
            assert len(collects) == len(drains), collects
            collect_s = statistics.median(collects)
            extra.update(collects_s=collects, decoded_wal_bytes=decoded,
                         collected_changes=collected)
            line += (f"; its collect read {statistics.median(collected):,.0f} changes from the slot "
                     f"({statistics.median(decoded):,.0f} WAL bytes to decode) in "
                     f"{collect_s:.3f} s ({collect_s / drain_s:.0%} of the drain)")
        rows.append(harness.Row("capture", f"{args.changed:,} changed among {args.rows:,}: "
                                f"drain ({mode})", drain_s, "s", "full-scan sweep", scan_s, ratio,
                                ">= 50x faster", ratio >= 50, extra))
        print(line, flush=True)

    for mode in modes:
        queue = use(mode)
        assert queue.installed() and (mode == "logical" or queue.stats()[0] == 0)
        if args.only != "drain":
            if mode == "trigger":
                trigger_updates(queue)
            else:
                logical_updates(queue)
        if args.only != "updates":
            drain_against_scan(mode, queue)

    writer[0].close()
    print(f"load average {harness.load_average()}", flush=True)
    harness.print_table(rows)
    print("results:", harness.write_json("capture", rows, vars(args)))
    return rows


if __name__ == "__main__":
    main()
