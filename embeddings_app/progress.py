"""What the admin shows of each version, read from the progress records, never from the rows.

The list page and its JSON status endpoint call ``statuses()`` for a page of versions: a fixed
number of queries (latest run per version, failure counts, index catalog, index builds under way)
whatever the number of versions or of rows in the embedded tables. Coverage therefore comes from
``BackfillRun`` figures, not from ``COUNT(*)``; the detail page adds the exact live counts of one
version (``lifecycle.readiness``), which is one scan of one table on request. Its charts are
inline SVG drawn here (no script library): coverage over time of the latest backfill run, and a
shadowed candidate's hourly ``ShadowBucket`` rows (one point and one bar per hour).
"""

from __future__ import annotations

import contextlib
import html
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from django.db import connection
from django.db.models import Count
from django.utils import timezone

from . import backfill, indexes
from .exceptions import EmbeddingError
from .models import BackfillRun, EmbeddingVersion, RowFailure, ShadowBucket, State

# States whose vectors are all present and kept fresh by dual-write once a backfill completed.
KEPT_COMPLETE = (State.READY, State.ACTIVE, State.STANDBY)


@dataclass
class VersionStatus:
    pk: int
    state: str
    active: bool
    done: int | None  # rows covered (None: unknown)
    total: int | None
    percent: float | None
    coverage_note: str  # where the figures come from, shown as a tooltip
    stale: int | None  # None: not tracked without a table scan (see the detail page)
    failures: int  # recorded per-row failures
    run_failed_rows: int
    last_error: str
    index: str  # "valid" | "invalid" | "none" | "building" | "unknown target" | "-"
    index_percent: float | None  # an index build under way
    index_phase: str
    rate: float | None  # rows per second of the running backfill
    eta_seconds: float | None
    running: bool  # a backfill or an index build is under way: the page polls faster
    stalled: bool  # a backfill no worker is working on (no live batch lease): no ETA
    run_id: int | None
    last_change: str  # ISO time of the last state change or progress record

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["rate_label"] = ("stalled: no worker holds a batch" if self.stalled
                              else rate_label(self.rate, self.eta_seconds))
        data["coverage_label"] = coverage_label(self.done, self.total, self.percent)
        return data


def coverage_label(done: int | None, total: int | None, percent: float | None) -> str:
    if done is None or total is None:
        return "unknown"
    return f"{done:,} / {total:,} ({percent:.1f}%)" if percent is not None else f"{done:,} / {total:,}"


def duration_label(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def rate_label(rate: float | None, eta: float | None) -> str:
    if not rate:
        return ""
    text = f"{rate:,.0f} rows/s" if rate >= 10 else f"{rate:.1f} rows/s"
    return f"{text}, ETA {duration_label(eta)}" if eta is not None else text


def latest_runs(version_ids: Sequence[int]) -> dict[int, BackfillRun]:
    """The most recent run of each version, in one query (PostgreSQL DISTINCT ON)."""
    runs = (backfill.with_live_lease(BackfillRun.objects.filter(version_id__in=version_ids))
            .order_by("version_id", "-started_at", "-id").distinct("version_id")
            .defer("progress_samples"))
    return {run.version_id: run for run in runs}


def failure_counts(version_ids: Sequence[int]) -> dict[int, int]:
    rows = (RowFailure.objects.filter(version_id__in=version_ids).values("version_id")
            .annotate(n=Count("id")).order_by())
    return {row["version_id"]: row["n"] for row in rows}


def index_catalog(names: Iterable[str]) -> tuple[dict[str, bool], dict[str, tuple[str, float | None]]]:
    """(validity by index name, (phase, percent) of builds under way by index name): two queries."""
    names = sorted(set(names))
    if not names:
        return {}, {}
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT i.relname, x.indisvalid FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
            "WHERE i.relname = ANY(%s)", [names])
        valid = {name: bool(ok) for name, ok in cursor.fetchall()}
        cursor.execute(
            "SELECT i.relname, p.phase, p.tuples_done, p.tuples_total, p.blocks_done, p.blocks_total "
            "FROM pg_stat_progress_create_index p JOIN pg_class i ON i.oid = p.index_relid "
            "WHERE i.relname = ANY(%s)", [names])
        building = {}
        for name, phase, tuples_done, tuples_total, blocks_done, blocks_total in cursor.fetchall():
            percent = None
            if tuples_total:
                percent = 100.0 * tuples_done / tuples_total
            elif blocks_total:
                percent = 100.0 * blocks_done / blocks_total
            building[name] = (phase, percent)
    return valid, building


def _coverage(version: EmbeddingVersion, run: BackfillRun | None) -> tuple[int | None, int | None, str]:
    if version.state == State.DROPPED:
        return None, None, "dropped: no stored vectors"
    if run is None:
        if version.state == State.NEW:
            return 0, None, "no backfill yet"
        return None, None, "no backfill recorded"
    if run.status == BackfillRun.Status.RUNNING:
        return run.rows_processed, run.rows_total, f"backfill run {run.pk} under way"
    if run.status == BackfillRun.Status.DONE:
        # finalize() only marks a run done when every row had a vector; dual-write keeps it so.
        note = f"complete at the end of run {run.pk}"
        if version.state in KEPT_COMPLETE:
            note += ", kept complete by dual-write"
        return run.rows_total, run.rows_total, note
    covered = max(run.rows_processed - run.rows_failed, 0)
    return covered, run.rows_total, f"run {run.pk} failed after {run.rows_processed} rows"


def statuses(versions: Sequence[EmbeddingVersion]) -> dict[int, VersionStatus]:
    """The status of each version, in a fixed number of queries."""
    ids = [v.pk for v in versions]
    runs = latest_runs(ids)
    failures = failure_counts(ids)
    names: dict[int, str] = {}
    for version in versions:
        # A target no longer declared (or a stray row) is shown without an index, never a crash.
        with contextlib.suppress(EmbeddingError):
            names[version.pk] = indexes.index_name(version)
    valid, building = index_catalog(names.values())
    stalled = backfill.stalled_runs(list(runs.values()))
    result = {}
    for version in versions:
        run = runs.get(version.pk)
        done, total, note = _coverage(version, run)
        percent = (100.0 * min(done, total) / total if total else (100.0 if total == 0 else None)) \
            if done is not None and total is not None else None
        if version.pk not in names:
            index, index_percent, phase = "unknown target", None, ""
        elif version.state == State.DROPPED:
            index, index_percent, phase = "-", None, ""
        elif names[version.pk] in building:
            index = "building"
            phase, index_percent = building[names[version.pk]]
        elif names[version.pk] in valid:
            index, index_percent, phase = ("valid" if valid[names[version.pk]] else "invalid"), None, ""
        else:
            index, index_percent, phase = "none", None, ""
        backfilling = run is not None and run.status == BackfillRun.Status.RUNNING
        stale = 0 if (version.state in KEPT_COMPLETE and run is not None
                      and run.status == BackfillRun.Status.DONE) else None
        last: datetime = version.state_changed_at
        if run is not None and run.updated_at > last:
            last = run.updated_at
        result[version.pk] = VersionStatus(
            pk=version.pk, state=version.state, active=version.state == State.ACTIVE,
            done=done, total=total, percent=percent, coverage_note=note, stale=stale,
            failures=failures.get(version.pk, 0),
            run_failed_rows=run.rows_failed if run else 0,
            last_error=(run.last_error if run else "")[:300],
            index=index, index_percent=index_percent, index_phase=phase,
            rate=run.rate if backfilling else None,
            eta_seconds=run.eta_seconds if backfilling and run.pk not in stalled else None,
            running=backfilling or index == "building",
            stalled=run is not None and run.pk in stalled,
            run_id=run.pk if run else None,
            last_change=timezone.localtime(last).isoformat(timespec="seconds"),
        )
    return result


# --- the coverage-over-time chart: inline SVG, no script or library needed -----------------------
CHART_W, CHART_H, PAD_L, PAD_B, PAD_T, PAD_R = 560, 200, 56, 28, 12, 12


def chart_points(run: BackfillRun) -> list[tuple[float, int]]:
    """(seconds since start, rows processed) from the run's samples, starting at (0, 0)."""
    start = run.started_at.timestamp()
    points = [(0.0, 0)]
    for t, rows in run.progress_samples or []:
        points.append((max(float(t) - start, 0.0), int(rows)))
    if run.status == BackfillRun.Status.RUNNING:
        points.append((max(timezone.now().timestamp() - start, points[-1][0]), run.rows_processed))
    return points


def chart_svg(run: BackfillRun | None) -> str:
    """An SVG line chart of coverage (% of rows processed) over time for ``run``."""
    if run is None:
        return '<p class="ev-chart-empty">No backfill run yet.</p>'
    points = chart_points(run)
    total = max(run.rows_total, 1)
    span = max(points[-1][0], 1.0)
    plot_w, plot_h = CHART_W - PAD_L - PAD_R, CHART_H - PAD_T - PAD_B

    def xy(t: float, rows: int) -> str:
        x = PAD_L + plot_w * t / span
        y = PAD_T + plot_h * (1 - min(rows, total) / total)
        return f"{x:.1f},{y:.1f}"

    line = " ".join(xy(t, rows) for t, rows in points)
    grid = []
    for pct in (0, 25, 50, 75, 100):
        y = PAD_T + plot_h * (1 - pct / 100)
        grid.append(f'<line x1="{PAD_L}" y1="{y:.1f}" x2="{CHART_W - PAD_R}" y2="{y:.1f}" '
                    f'class="ev-grid"/><text x="{PAD_L - 6}" y="{y + 4:.1f}" '
                    f'text-anchor="end">{pct}%</text>')
    last_pct = 100.0 * min(points[-1][1], total) / total
    title = (f"run {run.pk} ({run.status}): {points[-1][1]:,} of {run.rows_total:,} rows "
             f"({last_pct:.1f}%) in {duration_label(points[-1][0])}")
    return (
        f'<svg class="ev-chart" xmlns="http://www.w3.org/2000/svg" width="{CHART_W}" '
        f'height="{CHART_H}" viewBox="0 0 {CHART_W} {CHART_H}" role="img" '
        f'aria-label="{html.escape(title)}" data-points="{len(points)}">'
        f"<title>{html.escape(title)}</title>{''.join(grid)}"
        f'<polyline class="ev-line" fill="none" points="{line}"/>'
        f'<text x="{PAD_L}" y="{CHART_H - 8}">0:00</text>'
        f'<text x="{CHART_W - PAD_R}" y="{CHART_H - 8}" text-anchor="end">'
        f"{duration_label(span)}</text></svg>"
    )


# --- the shadow reads chart: one point per hourly ShadowBucket, inline SVG -------------------
SHADOW_W, SHADOW_H, SHADOW_PAD_L, SHADOW_PAD_R, SHADOW_PAD_T, SHADOW_PAD_B = 560, 220, 56, 56, 12, 44


def shadow_chart_svg(buckets: Sequence[ShadowBucket]) -> str:
    """Mean overlap@k (left axis, a point per hour with queries) and queries (right axis, a bar
    per hour) of a candidate's hourly shadow buckets, oldest first; each element's ``<title>``
    carries its figures. An empty state without buckets."""
    if not buckets:
        return ('<p class="ev-chart-empty">No shadow queries recorded yet: start shadow reads and '
                "let live searches reach the candidate.</p>")
    first = buckets[0].hour
    slots = max(int((b.hour - first).total_seconds() // 3600) for b in buckets) + 1
    plot_w = SHADOW_W - SHADOW_PAD_L - SHADOW_PAD_R
    plot_h = SHADOW_H - SHADOW_PAD_T - SHADOW_PAD_B
    slot = plot_w / slots
    most = max(max(b.queries for b in buckets), 1)
    bottom = SHADOW_PAD_T + plot_h

    def hour_label(bucket: ShadowBucket) -> str:
        return f"{bucket.hour.astimezone(UTC):%Y-%m-%d %H:00} UTC"

    parts: list[str] = []
    line: list[str] = []
    points: list[str] = []
    for fraction in (0.0, 0.5, 1.0):  # left axis: overlap@k; right axis: queries per hour
        y = SHADOW_PAD_T + plot_h * (1 - fraction)
        parts.append(f'<line x1="{SHADOW_PAD_L}" y1="{y:.1f}" x2="{SHADOW_W - SHADOW_PAD_R}" '
                     f'y2="{y:.1f}" class="ev-grid"/>'
                     f'<text x="{SHADOW_PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end">'
                     f"{fraction:.1f}</text>"
                     f'<text x="{SHADOW_W - SHADOW_PAD_R + 6}" y="{y + 4:.1f}">'
                     f"{most * fraction:g}</text>")
    for bucket in buckets:
        x = SHADOW_PAD_L + slot * ((bucket.hour - first).total_seconds() // 3600 + 0.5)
        height = plot_h * bucket.queries / most
        label = hour_label(bucket)
        parts.append(
            f'<rect class="ev-shadow-queries" x="{x - slot * 0.4:.1f}" y="{bottom - height:.1f}" '
            f'width="{slot * 0.8:.1f}" height="{height:.1f}" data-hour="{label}" '
            f'data-queries="{bucket.queries}"><title>{label}: {bucket.queries} queries'
            "</title></rect>")
        if bucket.queries:
            mean = bucket.overlap_sum / bucket.queries
            y = SHADOW_PAD_T + plot_h * (1 - min(max(mean, 0.0), 1.0))
            line.append(f"{x:.1f},{y:.1f}")
            points.append(
                f'<circle class="ev-shadow-overlap" cx="{x:.1f}" cy="{y:.1f}" r="3" '
                f'data-hour="{label}" data-overlap="{mean:.6f}" data-queries="{bucket.queries}">'
                f"<title>{label}: mean overlap@k {mean:.3f} over {bucket.queries} queries"
                "</title></circle>")
    if len(line) > 1:  # under the points
        parts.append(f'<polyline class="ev-line" fill="none" points="{" ".join(line)}"/>')
    parts.extend(points)
    last = buckets[-1]
    title = (f"shadow reads per hour, {hour_label(buckets[0])} to {hour_label(last)}: mean "
             "overlap@k (points, left axis) and queries (bars, right axis)")
    middle_y = SHADOW_PAD_T + plot_h / 2
    return (
        f'<svg class="ev-chart ev-shadow-chart" xmlns="http://www.w3.org/2000/svg" '
        f'width="{SHADOW_W}" height="{SHADOW_H}" viewBox="0 0 {SHADOW_W} {SHADOW_H}" role="img" '
        f'aria-label="{html.escape(title)}" data-points="{len(buckets)}">'
        f"<title>{html.escape(title)}</title>{''.join(parts)}"
        f'<text x="{SHADOW_PAD_L}" y="{bottom + 16:.1f}">{hour_label(buckets[0])}</text>'
        f'<text x="{SHADOW_W - SHADOW_PAD_R}" y="{bottom + 16:.1f}" text-anchor="end">'
        f"{hour_label(last)}</text>"
        f'<text x="{SHADOW_PAD_L + plot_w / 2:.1f}" y="{SHADOW_H - 6}" text-anchor="middle" '
        'class="ev-axis-title">hour (UTC), one bar and one point per hour</text>'
        f'<text x="14" y="{middle_y:.1f}" text-anchor="middle" class="ev-axis-title" '
        f'transform="rotate(-90 14 {middle_y:.1f})">mean overlap@k</text>'
        f'<text x="{SHADOW_W - 10}" y="{middle_y:.1f}" text-anchor="middle" '
        f'class="ev-axis-title" transform="rotate(90 {SHADOW_W - 10} {middle_y:.1f})">'
        "queries per hour</text></svg>"
    )
