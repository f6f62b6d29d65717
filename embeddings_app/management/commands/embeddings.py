"""``manage.py embeddings <subcommand>``: the lifecycle of embedding versions."""

from __future__ import annotations

import sys
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, connection
from tqdm import tqdm

from embeddings_app import (
    adopt,
    backfill,
    capture,
    compare,
    derive,
    indexes,
    layout,
    lifecycle,
    probes,
    registry,
    rollout,
    stores,
    sync,
    tasks,
    truncation,
)
from embeddings_app import estimate as estimates
from embeddings_app import shadow as shadow_module  # do_compare has an argument "shadow"
from embeddings_app.config import LAYOUTS, get_config
from embeddings_app.exceptions import EmbeddingError
from embeddings_app.models import STORED_STATES, BackfillRun, EmbeddingVersion, State

ACTOR = "manage.py"


def _chunk_arguments(parser: Any) -> None:
    """``--chunks`` and ``--overlap`` (a chunked version: embeddings_app.chunking)."""
    parser.add_argument("--chunks", type=int, metavar="TOKENS",
                        help="a chunked version: one vector per chunk of at most TOKENS of the "
                             "model's tokens, in a table of its own; search ranks rows by their "
                             'best chunk (default: the alias\'s "chunks"; 0: whole rows)')
    parser.add_argument("--overlap", "--chunk-overlap", dest="overlap", type=int,
                        metavar="TOKENS", help="tokens neighbouring chunks may share (default: "
                                               'the alias\'s "chunk_overlap", else 0)')


class Command(BaseCommand):
    help = "Manage embedding model versions: status, add, backfill, activate, rollback, ..."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")

        p = sub.add_parser("status", help="every version, its state, coverage and failures")
        p.add_argument("target", nargs="?")

        p = sub.add_parser("add", help="register a version and add its column or table")
        p.add_argument("target")
        p.add_argument("version")
        p.add_argument("--model", required=True, metavar="ALIAS")
        p.add_argument("--layout", choices=LAYOUTS,
                       help='where its vectors live (default: EMBEDDINGS["LAYOUT"], "column")')
        _chunk_arguments(p)

        p = sub.add_parser("adopt", help="register vectors you already have as a version, "
                           "without re-encoding them (a sample is re-embedded and compared)")
        p.add_argument("target")
        p.add_argument("version")
        p.add_argument("--model", required=True, metavar="ALIAS",
                       help="the model (alias) that made the vectors")
        p.add_argument("--column", required=True, metavar="NAME",
                       help="the vector column: of the target's table, or of --table")
        p.add_argument("--table", metavar="NAME",
                       help="a table of its own holding key -> vector (copied into the version)")
        p.add_argument("--key", metavar="NAME",
                       help="--table's column holding your rows' primary key (default: its "
                            "primary key)")
        p.add_argument("--layout", choices=LAYOUTS,
                       help="where the version's vectors live (default: a column of the "
                            "target's table in place; --table's copied into a side table)")
        p.add_argument("--sample", type=int,
                       help='rows re-embedded and compared (EMBEDDINGS["VERIFY_SAMPLE"])')
        p.add_argument("--threshold", type=float, help="min cosine similarity (the verify "
                                                       "threshold)")
        p.add_argument("--verify-all", action="store_true",
                       help="re-embed every row; replace the vectors that do not match")
        p.add_argument("--inline", action="store_true",
                       help="run the backfill of missing or changed rows in this process")
        p.add_argument("--batch-size", type=int)

        p = sub.add_parser("derive", help="a version computed from another's vectors (truncated "
                           "and re-normalized, or half precision) without running the model")
        p.add_argument("target")
        p.add_argument("version")
        p.add_argument("--from", dest="parent", required=True, metavar="VERSION")
        p.add_argument("--dimensions", type=int, metavar="N",
                       help="keep the first N dimensions (a Matryoshka model), re-normalized")
        p.add_argument("--storage", choices=("vector", "halfvec", "bit"))
        p.add_argument("--model", metavar="ALIAS", help="the alias computing the derived "
                       "vectors (default: the one configured with the same model and "
                       "truncate_dim / storage)")
        p.add_argument("--layout", choices=LAYOUTS)
        p.add_argument("--sample", type=int, help="rows whose derived vectors are compared "
                       "with the alias's output first")
        p.add_argument("--inline", action="store_true",
                       help="run the backfill of rows the parent lacks in this process")
        p.add_argument("--batch-size", type=int)

        p = sub.add_parser("backfill", help="embed every missing or stale row of a version")
        p.add_argument("target")
        p.add_argument("version")
        p.add_argument("--inline", action="store_true", help="run the batches in this process")
        p.add_argument("--batch-size", type=int)
        p.add_argument("--no-wait", action="store_true", help="dispatch and return")
        p.add_argument("--estimate", action="store_true",
                       help="print rows, tokens, requests, time and cost; embed nothing")

        p = sub.add_parser("index", help="build the HNSW index (concurrently: writes go on)")
        p.add_argument("target")
        p.add_argument("version")
        p.add_argument("--m", type=int, help="HNSW m (default: the version's, 16)")
        p.add_argument("--ef-construction", type=int, help="HNSW ef_construction (default 64)")
        p.add_argument("--ef-search", type=int, help="hnsw.ef_search for this version's searches")
        p.add_argument("--maintenance-work-mem", metavar="SIZE",
                       help='the build session\'s maintenance_work_mem, e.g. 2GB (default: '
                            'EMBEDDINGS["INDEX_MAINTENANCE_WORK_MEM"], else the server\'s)')
        p.add_argument("--parallel-workers", type=int, metavar="N",
                       help="the build session's max_parallel_maintenance_workers (default: "
                            'EMBEDDINGS["INDEX_PARALLEL_WORKERS"], else the server\'s)')

        p = sub.add_parser("verify", help="re-embed a sample and compare; exit 1 on any drift")
        p.add_argument("target")
        p.add_argument("version")
        p.add_argument("--sample", type=int, help='rows re-embedded (EMBEDDINGS["VERIFY_SAMPLE"])')
        p.add_argument("--threshold", type=float,
                       help='min cosine similarity (EMBEDDINGS["VERIFY_THRESHOLD"], 0.999)')
        p.add_argument("--model", metavar="ALIAS",
                       help="compare the stored vectors with another alias (e.g. a patch release)")

        p = sub.add_parser("probe", help="re-embed each version's probe texts and compare; "
                           "exit 1 if a model's output changed under its name")
        p.add_argument("target", nargs="?")

        p = sub.add_parser("compare", help="shadow reads: the same queries against two versions")
        p.add_argument("target")
        p.add_argument("version_a")
        p.add_argument("version_b")
        p.add_argument("--queries", metavar="FILE", help="TSV: query<TAB>relevant row key")
        p.add_argument("--k", type=int, default=10)
        p.add_argument("--sample", type=int, default=100, help="proxy queries drawn (no FILE)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--shadow", action="store_true",
                       help="also show each version's shadow reads of live searches, per hour")

        p = sub.add_parser("shadow", help="answer a share of live searches with a candidate "
                           "version too, off the request path, and record the comparison")
        p.add_argument("target")
        p.add_argument("version", nargs="?")
        p.add_argument("--rate", type=float, help="share of plain searches shadowed, in (0, 1]")
        p.add_argument("--off", action="store_true", help="turn the target's shadow reads off")

        p = sub.add_parser("activate", help="switch reads to a version (atomic)")
        p.add_argument("target")
        p.add_argument("version")
        p.add_argument("--force", action="store_true")
        p.add_argument("--percent", type=int, default=100,
                       help="a gradual rollout: the version serves this share of the searches "
                       "beside the active one (sticky per search(key=...)); 100 completes it")

        p = sub.add_parser("rollback", help="reactivate the previous (standby) version")
        p.add_argument("target")

        p = sub.add_parser("retire", help="stop dual-writing a non-active version")
        p.add_argument("target")
        p.add_argument("version")

        p = sub.add_parser("drop", help="drop the index and the column or table of a retired version")
        p.add_argument("target")
        p.add_argument("version")
        p.add_argument("--yes", action="store_true", help="do not ask for confirmation")

        p = sub.add_parser("capture", help="install (or update) the trigger that queues rows "
                           "written without a save signal; --remove removes it")
        p.add_argument("target")
        p.add_argument("--remove", action="store_true")

        p = sub.add_parser("migrate", help="add, backfill, index, verify, activate; resumable")
        p.add_argument("target")
        p.add_argument("--to", required=True, metavar="ALIAS")
        p.add_argument("--version", dest="version_name", metavar="NAME")
        p.add_argument("--layout", choices=LAYOUTS,
                       help='where a new version\'s vectors live (default: EMBEDDINGS["LAYOUT"])')
        _chunk_arguments(p)
        p.add_argument("--inline", action="store_true")
        p.add_argument("--batch-size", type=int)
        p.add_argument("--estimate", action="store_true",
                       help="print rows, tokens, requests, time and cost; change nothing")

    def handle(self, *args: Any, subcommand: str, **options: Any) -> None:
        try:
            getattr(self, f"do_{subcommand}")(**options)
        except EmbeddingError as exc:
            raise CommandError(self.render(exc, options)) from exc
        except DatabaseError as exc:
            refusal = lifecycle.dropped_meanwhile(exc)
            if refusal is None:
                raise
            raise CommandError(str(refusal)) from exc

    @staticmethod
    def render(exc: EmbeddingError, options: dict[str, Any]) -> str:
        """The error's line, and the flag of the subcommand's option it names (``exc.option``,
        a keyword argument such as ``batch_size``: the library's message names no flag)."""
        # The library's keyword argument -> the subcommand's option, where they differ.
        dest = {"alias": "model"}.get(exc.option or "", exc.option)
        if dest is not None and dest in options:
            return f"{exc} [--{dest.replace('_', '-')}]"
        return str(exc)

    # --- subcommands ------------------------------------------------------------------------
    def do_status(self, target: str | None = None, **_: Any) -> None:
        targets = [registry.get(target).target] if target else registry.all_targets()
        header = ("target", "version", "model@revision", "dims", "layout", "state", "",
                  "coverage", "stale", "index", "probe", "truncated", "failures")
        rows = []
        runs: list[tuple[EmbeddingVersion, BackfillRun]] = []
        measured: list[EmbeddingVersion] = []
        for name in targets:
            field = registry.get(name)
            versions = list(EmbeddingVersion.objects.for_target(name).select_related("derived_from"))
            stored = [v for v in versions if v.state != State.DROPPED]
            stale = dict(zip((v.pk for v in stored), sync.count_stale(field, stored), strict=True))
            for v in versions:
                if v.state == State.DROPPED:
                    coverage = "-"
                else:
                    done, total = v.store.coverage()
                    coverage = f"{done}/{total}"
                run = v.runs.first()
                if run is not None:
                    runs.append((v, run))
                # Rows that could not be embedded since the last run started (its own failures
                # and those of dual-writes meanwhile); older ones were retried by that run.
                recent = v.failures.all() if run is None else v.failures.filter(
                    at__gte=run.started_at)
                failed_rows = recent.count()
                failures = f"{failed_rows} rows" if failed_rows else ""
                if run is not None and run.last_error and run.status != BackfillRun.Status.DONE:
                    failures = f"{failures}; {run.last_error}".lstrip("; ")[:80]
                if v.write_error:  # a save could not write it: no rollback target
                    failures = f"NOT WRITTEN: {v.write_error}; {failures}".rstrip("; ")[:120]
                rows.append((name, v.lineage or v.version, _short(v.model_label),
                             str(v.dimensions) + ("" if v.storage == "vector" else f" {v.storage}"),
                             v.layout_label, v.state, "*" if v.state == State.ACTIVE else "",
                             coverage,
                             str(stale.get(v.pk, "-")), indexes.index_state(v), _probe_cell(v),
                             truncation.cell(v) if v.state != State.DROPPED else "-", failures))
                if v.state != State.DROPPED:
                    measured.append(v)
        if not rows:
            self.stdout.write("No embedding versions yet; add one with "
                              "`manage.py embeddings add TARGET VERSION --model ALIAS`.")
            return
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            self.stdout.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
        for v, run in runs:  # the progress record of each version's last backfill (no scan)
            self.stdout.write(_run_line(v, run))
        for v in measured:  # as last measured by add, verify or compare (never tokenized here)
            self.stdout.write(_truncation_line(v))
        for name in targets:  # a gradual rollout, and the reads each version served
            for v in measured:  # a rollout's candidate is ready: among them, already read
                if v.target == name and v.rollout_percent:
                    self.stdout.write(f"rollout: {v} serves {v.rollout_percent}% of the searches")
            line = rollout.reads_line(name)
            if line:
                self.stdout.write(line)
        for v in measured:  # live searches answered by a candidate too (the hourly sums)
            if v.shadow_rate or v.shadow_buckets.exists():
                self.stdout.write("shadow reads of " + shadow_module.summary(v).line())
        for name in targets:  # change capture: what waits for the sweep, and since when
            line = capture_line(name)
            if line:
                self.stdout.write(line)
        # Before a backfill, while the advice can still help.
        # (A version in a table of its own does not rewrite the target's table.)
        pending = EmbeddingVersion.objects.filter(target__in=targets, layout="column",
                                                  state__in=(State.NEW, State.BACKFILLING))
        for table in sorted({registry.get(name).table for name in
                             pending.values_list("target", flat=True).distinct()}):
            advice = layout.backfill_advice(table)
            if advice:
                self.stdout.write(self.style.WARNING(advice))

    def do_capture(self, target: str, remove: bool = False, **_: Any) -> None:
        field = registry.get(target)
        if remove:
            lifecycle.remove_capture(field.target)
            self.stdout.write(self.style.SUCCESS(
                f"Removed the change capture of {field.target}; its sweep reads every row."))
            return
        lifecycle.install_capture(field.target)
        queue = capture.queue(field)
        assert queue is not None
        how = (f", read from the write-ahead log by the slot {stores.CaptureSlot().name},"
               if isinstance(queue, stores.LogicalChangeQueue) else "")
        self.stdout.write(self.style.SUCCESS(
            f"Change capture of {field.target} installed: rows inserted, or updated in "
            f"{', '.join(field.source_fields or ())}{how} are queued in {queue.queue}."))

    def do_add(self, target: str, version: str, model: str, layout: str | None = None,
               chunks: int | None = None, overlap: int | None = None, **_: Any) -> None:
        record = lifecycle.add(target, version, model, layout=layout, chunks=chunks,
                               overlap=overlap, actor=ACTOR)
        self.stdout.write(self.style.SUCCESS(
            f"Added {record} ({record.model_label}, {record.dimensions} dims, {record.storage}"
            + (f", chunks of {record.chunk_tokens} tokens overlapping by at most "
               f"{record.chunk_overlap}" if record.chunk_tokens else "") + "); "
            f"{record.store.describe()}. Next: embeddings backfill {target} {version}"
        ))
        self.stdout.write(_truncation_line(record))
        self._layout_advice(record)

    def do_adopt(self, target: str, version: str, model: str, column: str,
                 table: str | None = None, key: str | None = None, layout: str | None = None,
                 sample: int | None = None, threshold: float | None = None,
                 verify_all: bool = False, inline: bool = False, batch_size: int | None = None,
                 **_: Any) -> None:
        field = registry.get(target)
        bar = tqdm(total=field.model._base_manager.count(), unit="row",
                   desc=f"adopt {version}", file=self.stderr._out, disable=None,
                   dynamic_ncols=True)
        try:
            record, report = adopt.adopt(
                field.target, version, model, column=column, table=table, key=key,
                layout=layout, sample=sample, threshold=threshold, verify_all=verify_all,
                batch_size=batch_size, actor=ACTOR, progress=bar.update)
        finally:
            bar.close()
        for line in report.lines():
            self.stdout.write(line)
        # Rows without a vector, changed meanwhile or with empty text: the usual backfill.
        self._backfill(record, inline=inline, batch_size=batch_size, wait=True)
        self.stdout.write(self.style.SUCCESS(
            f"{record} is ready ({record.store.describe()}). Next: embeddings index "
            f"{field.target} {version}, verify, activate (or `embeddings migrate "
            f"{field.target} --to {model}`, which resumes it)."))

    def do_derive(self, target: str, version: str, parent: str, dimensions: int | None = None,
                  storage: str | None = None, model: str | None = None,
                  layout: str | None = None, sample: int | None = None, inline: bool = False,
                  batch_size: int | None = None, **_: Any) -> None:
        field = registry.get(target)
        record, report = derive.derive(
            field.target, version, parent, dimensions=dimensions, storage=storage, alias=model,
            layout=layout, sample=sample, batch_size=batch_size, actor=ACTOR)
        for line in report.lines():
            self.stdout.write(line)
        self._backfill(record, inline=inline, batch_size=batch_size, wait=True)
        self.stdout.write(self.style.SUCCESS(
            f"{record} is ready ({record.model_alias}, {record.storage}({record.dimensions}), "
            f"{record.store.describe()}). Next: embeddings index {field.target} {version}, "
            "verify, activate."))

    def _layout_advice(self, record: EmbeddingVersion) -> None:
        """For a version added in a column: why a table of its own may be better, and what a
        column's backfill costs on this table's layout."""
        if record.layout != "column":
            return
        table = record.store.table
        advice = layout.layout_advice(table)
        if advice:
            self.stdout.write(self.style.WARNING(
                f"{advice} For a new version: add it with --layout table (drop {record.version} "
                "first if it holds nothing yet)."))
        advice = layout.backfill_advice(table)
        if advice:
            self.stdout.write(self.style.WARNING(advice))

    def do_backfill(self, target: str, version: str, inline: bool = False,
                    batch_size: int | None = None, no_wait: bool = False, estimate: bool = False,
                    **_: Any) -> None:
        record = EmbeddingVersion.objects.get_version(registry.get(target).target, version)
        if estimate:
            for line in estimates.for_backfill(record, batch_size).lines():
                self.stdout.write(line)
            return
        self._backfill(record, inline=inline, batch_size=batch_size, wait=not no_wait)

    def do_index(self, target: str, version: str, m: int | None = None,
                 ef_construction: int | None = None, ef_search: int | None = None,
                 maintenance_work_mem: str | None = None, parallel_workers: int | None = None,
                 **_: Any) -> None:
        target = registry.get(target).target
        self._index(target, version, m=m, ef_construction=ef_construction, ef_search=ef_search,
                    maintenance_work_mem=maintenance_work_mem, parallel_workers=parallel_workers)

    def _index(self, target: str, version: str, **params: Any) -> None:
        record = EmbeddingVersion.objects.get_version(target, version)
        state = indexes.index_state(record)
        if state == "invalid":
            self.stderr.write(self.style.WARNING(
                f"Index {indexes.index_name(record)} is INVALID (a failed build); rebuilding."))
        started = time.monotonic()
        bar = tqdm(total=100, unit="%", desc=f"index {version}", file=self.stderr._out,
                   disable=None, dynamic_ncols=True)

        def progress(reading: indexes.Progress) -> None:
            bar.set_postfix_str(reading.phase)
            if reading.fraction is not None:
                bar.update(max(int(reading.fraction * 100) - bar.n, 0))

        def on_plan(plan: indexes.BuildPlan) -> None:
            if plan.session:  # the build is over: what the server said during it
                for notice in plan.notices:
                    self.stderr.write(self.style.WARNING(f"PostgreSQL: {notice}"))
                return
            for line in plan.lines():  # before the build: the estimate and the settings
                self.stdout.write(line)
            for warning in plan.warnings:
                self.stderr.write(self.style.WARNING(f"Warning: {warning}"))

        try:
            name = lifecycle.build_index(target, version, progress=progress, on_plan=on_plan,
                                         **params)
        finally:
            bar.close()
        record.refresh_from_db()
        self.stdout.write(self.style.SUCCESS(
            f"Index {name} on {record.store.describe_indexed()} is valid (m={record.hnsw_m}, "
            f"ef_construction={record.hnsw_ef_construction}, ef_search={record.hnsw_ef_search}; "
            f"{time.monotonic() - started:.1f}s)."
        ))

    def do_verify(self, target: str, version: str, sample: int | None = None,
                  threshold: float | None = None, model: str | None = None, **_: Any) -> None:
        target = registry.get(target).target
        report = lifecycle.verify(target, version, sample=sample, threshold=threshold,
                                  model=model, actor=ACTOR)
        self._print_verify(report)
        if not report.passed:
            raise CommandError(report.summary())

    def _print_verify(self, report: Any) -> None:
        self.stdout.write(f"verify {report.version} against model {report.alias}:")
        fingerprint = ("ok" if report.fingerprint_ok else
                       f"{report.fingerprint_now[:12] or '?'} != pinned "
                       f"{report.fingerprint_pinned[:12]}")
        self.stdout.write(f"  fingerprint   {fingerprint}")
        self.stdout.write(f"  coverage      {report.covered}/{report.total} rows")
        self.stdout.write(f"  stale         {report.stale} rows")
        cosine = ("-" if report.min_cosine is None else
                  f"min {report.min_cosine:.5f}, mean {report.mean_cosine:.5f}")
        self.stdout.write(f"  sample        {report.compared} of {report.sampled} compared, "
                          f"{report.below_threshold} below {report.threshold} ({cosine})")
        figure = truncation.Truncation.from_dict(report.truncation)
        if figure is not None:
            self.stdout.write(f"  truncation    {figure.summary()}")
        if report.passed:
            self.stdout.write(self.style.SUCCESS(report.summary()))

    def do_probe(self, target: str | None = None, **_: Any) -> None:
        versions = EmbeddingVersion.objects.filter(state__in=STORED_STATES)
        if target:
            versions = versions.filter(target=registry.get(target).target)
        failed = []
        for version in versions:
            report = probes.run(version)
            line = report.summary()
            if report.passed:
                self.stdout.write(line)
            else:
                self.stdout.write(self.style.ERROR(line))
                failed.append(str(version))
            if report.cosines:
                self.stdout.write("  cosines " + " ".join(f"{c:.5f}" for c in report.cosines))
        if failed:
            raise CommandError(f"probes failed for {', '.join(failed)}: the model's output "
                               "changed under its name (see above).")

    def do_compare(self, target: str, version_a: str, version_b: str, queries: str | None = None,
                   k: int = 10, sample: int = 100, seed: int = 0, shadow: bool = False,
                   **_: Any) -> None:
        target = registry.get(target).target
        parsed = compare.read_queries(queries) if queries else None
        report = compare.compare(target, version_a, version_b, queries=parsed, k=k,
                                 sample=sample, seed=seed, source=queries or "")
        for line in report.lines():
            self.stdout.write(line)
        if shadow:
            for name in (version_a, version_b):
                self._shadow_report(EmbeddingVersion.objects.get_version(target, name))

    def _shadow_report(self, version: EmbeddingVersion) -> None:
        """The shadow reads of ``version`` (live searches it answered too), in all and per hour."""
        self.stdout.write(f"shadow reads of {shadow_module.summary(version).line()}")
        for bucket in version.shadow_buckets.order_by("hour"):
            self.stdout.write(
                f"  {bucket.hour:%Y-%m-%d %H:00}  {bucket.queries} queries, overlap@k "
                f"{bucket.overlap_sum / bucket.queries:.3f}, "
                f"{bucket.unranked_rows} served rows unranked" if bucket.queries else
                f"  {bucket.hour:%Y-%m-%d %H:00}  0 queries")

    def do_shadow(self, target: str, version: str | None = None, rate: float | None = None,
                  off: bool = False, **_: Any) -> None:
        target = registry.get(target).target
        if off:
            stopped = shadow_module.stop(target, actor=ACTOR)
            names = ", ".join(v.version for v in stopped) or "none was on"
            self.stdout.write(self.style.SUCCESS(f"{target}: shadow reads off ({names})."))
            return
        if version is None or rate is None:
            raise CommandError("Give a VERSION and --rate R (e.g. --rate 0.1), or --off.")
        record = shadow_module.start(target, version, rate, actor=ACTOR)
        self.stdout.write(self.style.SUCCESS(
            f"{record}: shadow reads at {record.shadow_rate:.0%} of {target}'s plain searches, "
            "answered on workers off the request path; they end at activate, rollback, retire "
            f"or drop. See `manage.py embeddings status {target}`."))

    def do_activate(self, target: str, version: str, force: bool = False, percent: int = 100,
                    **_: Any) -> None:
        for warning in lifecycle.activate(target, version, force=force, percent=percent,
                                          actor=ACTOR):
            self.stderr.write(self.style.WARNING(warning))
        if percent < 100:
            self.stdout.write(self.style.SUCCESS(
                f"{target}: {version} now serves {percent}% of the searches (sticky per "
                f"search(key=...)); `activate {target} {version}` completes the flip, `rollback "
                f"{target}` ends it at once."))
            return
        self.stdout.write(self.style.SUCCESS(f"{target}: reads now use version {version}."))

    def do_rollback(self, target: str, **_: Any) -> None:
        version = lifecycle.rollback(target, actor=ACTOR)
        self.stdout.write(self.style.SUCCESS(
            f"{target}: rolled back; reads now use version {version.version}."
        ))

    def do_retire(self, target: str, version: str, **_: Any) -> None:
        record = lifecycle.retire(target, version, actor=ACTOR)
        self.stdout.write(self.style.SUCCESS(f"{target}@{version} retired: no longer written."))
        warning = lifecycle.retire_warning(record)
        if warning:
            self.stdout.write(self.style.WARNING(f"Warning: {warning}"))

    def do_drop(self, target: str, version: str, yes: bool = False, **_: Any) -> None:
        record = EmbeddingVersion.objects.get_version(target, version)
        lifecycle.check_droppable(record, yes=yes)
        where = record.store.describe_storage()
        if not yes:
            if not sys.stdin.isatty():
                raise CommandError(
                    f"drop deletes {where} and its index for good; "
                    "confirm with --yes when not running interactively."
                )
            answer = input(f"Drop {where} and its index? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                raise CommandError("Not dropped.")
        dropped = lifecycle.drop(target, version, actor=ACTOR, yes=True)
        self.stdout.write(self.style.SUCCESS(
            f"{target}@{version} dropped: {where}"
            + (f" and index {', '.join(dropped)}" if dropped else "") + " removed."
        ))

    def do_migrate(self, target: str, to: str, version_name: str | None = None,
                   layout: str | None = None, chunks: int | None = None,
                   overlap: int | None = None, inline: bool = False,
                   batch_size: int | None = None, estimate: bool = False, **_: Any) -> None:
        field = registry.get(target)
        existing = EmbeddingVersion.objects.for_target(field.target)
        resumable = existing.filter(model_alias=to).exclude(
            state__in=(State.RETIRED, State.DROPPED, State.ACTIVE)
        )
        record = (resumable.filter(version=version_name).first() if version_name
                  else resumable.order_by("-created_at").first())
        if estimate:  # what a resumed or new migration would embed; nothing is added
            found = (estimates.for_backfill(record, batch_size) if record is not None
                     else estimates.for_migration(field.target, to, batch_size))
            for line in found.lines():
                self.stdout.write(line)
            return
        if existing.filter(model_alias=to, state=State.ACTIVE).exists() and record is None:
            raise CommandError(f"{field.target} already reads from a version of model {to}.")
        steps = 5
        if record is None:
            name = version_name or _next_version_name(existing.values_list("version", flat=True))
            self.stdout.write(f"[1/{steps}] add {name} with model {to}")
            record = lifecycle.add(field.target, name, to, layout=layout, chunks=chunks,
                                   overlap=overlap, actor=ACTOR)
            self.stdout.write(f"  {record.store.describe()}")
            self.stdout.write(f"  {_truncation_line(record)}")
        elif chunks is not None and (chunks or None) != record.chunk_tokens:
            raise CommandError(
                f"{record} is being built with chunks of {record.chunk_tokens or 'whole rows'}"
                f"{' tokens' if record.chunk_tokens else ''}; run migrate without --chunks to "
                "resume it, or retire it and migrate to a new version.")
        elif layout is not None and layout != record.layout:
            raise CommandError(
                f"{record} is being built in the {record.layout} layout; run migrate without "
                f"--layout to resume it, or retire it and migrate to a new version.")
        else:
            self.stdout.write(f"[1/{steps}] add: resuming {record} ({record.state})")
        # Each step below is idempotent: re-running migrate after an interruption redoes only
        # what is missing (fresh rows are not re-encoded, a valid index is kept).
        ready = lifecycle.readiness(record)
        if record.state == State.READY and not ready.problems:
            self.stdout.write(f"[2/{steps}] backfill {record.version}: already complete "
                              f"({ready.done}/{ready.total} rows)")
        else:
            self.stdout.write(f"[2/{steps}] backfill {record.version}")
            self._backfill(record, inline=inline, batch_size=batch_size, wait=True)
        self.stdout.write(f"[3/{steps}] index {record.version}")
        self._index(field.target, record.version)
        self.stdout.write(f"[4/{steps}] verify {record.version}")
        report = lifecycle.verify(field.target, record.version, actor=ACTOR)
        self._print_verify(report)
        if not report.passed:
            raise CommandError(report.summary() + " Not activated; fix it and run migrate again.")
        self.stdout.write(f"[5/{steps}] activate {record.version}")
        lifecycle.activate(field.target, record.version, actor=ACTOR)
        self.stdout.write(self.style.SUCCESS(
            f"{field.target}: reads now use {record.version} ({record.model_label}); the previous "
            "version stays on standby for rollback until retired and dropped."
        ))

    # --- helpers ----------------------------------------------------------------------------
    def _backfill(self, record: EmbeddingVersion, *, inline: bool, batch_size: int | None,
                  wait: bool) -> None:
        mode = "inline" if inline else "celery"
        run, ranges = backfill.start(record, batch_size=batch_size, mode=mode, actor=ACTOR)
        bar = tqdm(total=run.rows_total, unit="row", desc=f"backfill {record.version}",
                   file=self.stderr._out, disable=None, dynamic_ncols=True)
        try:
            if inline:
                backfill.run_inline(run, ranges, progress=bar.update)
            else:
                tasks.dispatch(run, ranges)
                if not wait:
                    self.stdout.write(f"Dispatched {len(ranges)} batches to queue "
                                      f"'{get_config().queue}' "
                                      f"(run {run.pk}); follow with `embeddings status`.")
                    return
                self._follow(run, bar)
        finally:
            bar.close()
        run.refresh_from_db()
        if run.status != BackfillRun.Status.DONE:
            raise CommandError(f"Backfill of {record} failed: {run.last_error}; re-run to resume.")
        self.stdout.write(self.style.SUCCESS(
            f"Backfill of {record} done: {run.rows_embedded} embedded, {run.rows_skipped} empty, "
            f"{run.rows_processed - run.rows_embedded - run.rows_skipped} already fresh."
        ))

    def _follow(self, run: BackfillRun, bar: tqdm) -> None:
        """Poll the run's progress record until its last batch finalizes it. Every third of the
        batch lease, reclaim (re-dispatch) its batches whose worker died. A dropped database
        connection is reopened at the next poll."""
        reclaim_every = get_config().batch_lease / 3
        next_reclaim = time.monotonic() + reclaim_every
        while True:
            try:
                run.refresh_from_db()
                bar.update(max(run.rows_processed - bar.n, 0))
                if run.status != BackfillRun.Status.RUNNING:
                    return
                if time.monotonic() >= next_reclaim:
                    next_reclaim = time.monotonic() + reclaim_every
                    for batch in tasks.reclaim_expired(run.pk):
                        bar.write(f"batch {batch.number} reclaimed: the lease of {batch.worker} "
                                  "expired (its worker died?); re-dispatched")
            except tasks.CONNECTION_ERRORS as exc:
                bar.write(f"database connection lost ({type(exc).__name__}); reconnecting")
                backfill._close_quietly(connection)
            time.sleep(0.5)


def _run_line(version: EmbeddingVersion, run: BackfillRun) -> str:
    rate = f"{run.rate:.1f} rows/s" if run.rate else "-"
    if backfill.stalled_runs([run]):
        eta = (", stalled: no worker holds a batch (see `embeddings_app.reclaim` in "
               "docs/backfill.md)")
    else:
        eta = f", ETA {run.eta_seconds:.0f}s" if run.eta_seconds is not None else ""
    line = (f"backfill {version}: run {run.pk} {run.status}, batches {run.batches_done}/"
            f"{run.batches_total}, rows {run.rows_processed}/{run.rows_total} "
            f"(embedded {run.rows_embedded}, empty {run.rows_skipped}, failed {run.rows_failed}, "
            f"changed under a batch {run.rows_conflicted}), {rate}{eta}")
    return line + (f"; last error: {run.last_error[:200]}" if run.last_error else "")


def _truncation_line(version: EmbeddingVersion) -> str:
    """The version's last truncation figure, where and when it was measured."""
    figure = truncation.stored(version)
    if figure is None:
        return (f"truncation {version}: not measured yet (verify or compare measures it with "
                "the model's tokenizer)")
    return f"truncation {version}: {figure.summary()} (measured by {figure.when()})"


def _probe_cell(version: EmbeddingVersion) -> str:
    """The last probe comparison: "ok", or "CHANGED (min cosine)" when the output changed."""
    if version.probe_passed is None:
        return "-"
    if version.probe_passed:
        return "ok"
    minimum = version.probe_report.get("min_cosine")
    return "CHANGED" + (f" ({minimum:.4f})" if minimum is not None else "")


def _short(label: str, width: int = 60) -> str:
    return label if len(label) <= width else "..." + label[-(width - 3):]


def _next_version_name(names: Any) -> str:
    taken = set(names)
    number = 1
    while f"v{number}" in taken:
        number += 1
    return f"v{number}"


def capture_line(target: str) -> str:
    """The change capture of ``target`` for ``status``: its queue's depth and the age of its
    oldest entry, or why its sweep reads every row; empty for a target without versions."""
    if not EmbeddingVersion.objects.for_target(target).exclude(state=State.DROPPED).exists():
        return ""
    field = registry.get(target)
    reason = capture.uncapturable_reason(field)
    if reason is not None:
        return (f"{target}: change capture impossible ({reason}): the sweep reads every row; "
                f"call {field.model.__name__}.{field.name}.sync(queryset) after bulk writes")
    stats = capture.queue_stats(field)
    if stats is None:
        return (f"{target}: change capture not installed: the sweep reads every row; run "
                f"`manage.py embeddings capture {target}`")
    return f"{target}: change queue {capture.lag_label(*stats)}"
