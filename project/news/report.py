"""The demo's report: latency statistics per phase, the text report and the timeline chart.

Every figure here is computed from what the traffic threads and the sampler recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from project.news.traffic import Recorder


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def phase_stats(recorder: Recorder, start: float, end: float) -> dict[str, Any]:
    reads = [r for r in recorder.reads if start <= r.t < end]
    latencies = [r.latency_ms for r in reads if r.ok]
    served: dict[str, int] = {}
    for read in reads:
        if read.ok:
            served[read.version] = served.get(read.version, 0) + 1
    return {
        "start_s": round(start, 2),
        "end_s": round(end, 2),
        "reads": len(reads),
        "failed_reads": sum(1 for r in reads if not r.ok),
        "p50_ms": _round(percentile(latencies, 50)),
        "p95_ms": _round(percentile(latencies, 95)),
        "served_by": served,
        "writes": sum(1 for w in recorder.writes if start <= w.t < end),
        "failed_writes": sum(1 for w in recorder.writes if start <= w.t < end and not w.ok),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def chart(recorder: Recorder, path: Path, *, flip_t: float | None, new_version: str,
          migrate_start: float | None, migrate_end: float | None, title: str,
          shadow: tuple[float, float, str] | None = None,
          rollout: tuple[float, float, str] | None = None) -> Path:
    """The timeline: new-version coverage, read latency per serving version and writes over the
    whole run (the build shaded grey, the flip a red line); below them, zoomed on the shadow
    reads and the rollout (``shadow``'s and ``rollout``'s (start, end, legend text), shaded),
    the version that served each search."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zoom = shadow is not None or rollout is not None
    fig, axes = plt.subplots(
        4 if zoom else 3, 1, figsize=(11, 10.5 if zoom else 8),
        gridspec_kw={"height_ratios": [2, 2, 1, 1.3] if zoom else [2, 2, 1]})
    ax_cov, ax_lat, ax_w = axes[:3]
    for ax in (ax_lat, ax_w):
        ax.sharex(ax_cov)
    samples = [s for s in recorder.samples if s.version == new_version and s.total]
    if samples:
        ax_cov.plot([s.t for s in samples], [100 * s.done / s.total for s in samples],
                    color="tab:green", label=f"{new_version} coverage")
    ax_cov.set_ylabel(f"{new_version} coverage (%)")
    ax_cov.set_ylim(-2, 102)

    by_version: dict[str, list[tuple[float, float]]] = {}
    for read in recorder.reads:
        if read.ok:
            by_version.setdefault(read.version, []).append((read.t, read.latency_ms))
    colors = {version: f"C{number}" for number, version in enumerate(sorted(by_version))}
    for version, points in sorted(by_version.items()):
        ax_lat.scatter([p[0] for p in points], [p[1] for p in points], s=6,
                       color=colors[version], label=f"search served by {version}")
    failed = [r for r in recorder.reads if not r.ok]
    if failed:
        ax_lat.scatter([r.t for r in failed], [r.latency_ms for r in failed], s=30, marker="x",
                       color="red", label=f"failed reads ({len(failed)})")
    ax_lat.set_ylabel("read latency (ms)")
    ax_lat.set_yscale("log")

    for kind, color, y in (("edit", "tab:blue", 1), ("insert", "tab:orange", 0)):
        times = [w.t for w in recorder.writes if w.kind == kind]
        ax_w.scatter(times, [y] * len(times), marker="|", s=80, color=color,
                     label=f"{kind}s ({len(times)})")
    ax_w.set_yticks([0, 1], ["insert", "edit"])
    ax_w.set_ylim(-0.7, 1.7)
    ax_w.set_xlabel("seconds since the demo started")

    spans = [(span, color) for span, color in ((shadow, "tab:cyan"), (rollout, "tab:orange"))
             if span is not None]
    for ax in (ax_cov, ax_lat, ax_w):
        if migrate_start is not None and migrate_end is not None:
            ax.axvspan(migrate_start, migrate_end, color="0.92", zorder=0)
        for (start, end, _), color in spans:
            ax.axvspan(start, end, color=color, alpha=0.2, zorder=0)
        if flip_t is not None:
            ax.axvline(flip_t, color="red", linestyle="--", linewidth=1)
    if flip_t is not None:
        ax_cov.annotate(f"flip to {new_version}", (flip_t, 50), xytext=(5, 0),
                        textcoords="offset points", color="red")
    for ax in (ax_cov, ax_lat, ax_w):
        ax.legend(loc="upper left", fontsize=8)

    if zoom:
        # Each search as a tick on the row of the version that served it, from a few seconds
        # before the shadow reads to the end of the traffic.
        ax_z = axes[3]
        starts = [span[0] for span, _ in spans]
        ends = [t for t in (flip_t, *(span[1] for span, _ in spans)) if t is not None]
        last = max((r.t for r in recorder.reads), default=max(ends))
        first = min(starts) - 0.3 * (max(ends) - min(starts))
        versions = sorted(by_version)
        for row, version in enumerate(versions):
            times = [r.t for r in recorder.reads if r.ok and r.version == version
                     and first <= r.t <= last]
            ax_z.scatter(times, [row] * len(times), marker="|", s=120, color=colors[version],
                         label=f"searches served by {version} ({len(times)})")
        for (start, end, text), color in spans:
            ax_z.axvspan(start, end, color=color, alpha=0.2, zorder=0, label=text)
        if flip_t is not None:
            ax_z.axvline(flip_t, color="red", linestyle="--", linewidth=1,
                         label=f"flip to {new_version}")
        ax_z.set_yticks(range(len(versions)), [f"served by {v}" for v in versions])
        ax_z.set_ylim(-0.8, len(versions) - 0.2 + 1.2)
        ax_z.set_xlim(first, last + 0.5)
        ax_z.set_xlabel("seconds since the demo started (zoom: shadow reads, rollout, flip)")
        ax_z.legend(loc="upper left", fontsize=8, ncol=3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
