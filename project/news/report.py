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
    """The timeline: new-version coverage, read latency per serving version, reads per second
    per serving version, writes; the build (grey), the shadow reads and the rollout (shaded
    spans, labelled with ``shadow``'s and ``rollout``'s (start, end, text)) and the flip."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_cov, ax_lat, ax_reads, ax_w) = plt.subplots(
        4, 1, figsize=(11, 10), sharex=True, gridspec_kw={"height_ratios": [2, 2, 1.5, 1]}
    )
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
    for version, points in sorted(by_version.items()):
        ax_lat.scatter([p[0] for p in points], [p[1] for p in points], s=6,
                       label=f"search served by {version}")
    failed = [r for r in recorder.reads if not r.ok]
    if failed:
        ax_lat.scatter([r.t for r in failed], [r.latency_ms for r in failed], s=30, marker="x",
                       color="red", label=f"failed reads ({len(failed)})")
    ax_lat.set_ylabel("read latency (ms)")
    ax_lat.set_yscale("log")

    # Reads per second, stacked by the version that served them (one bar per second).
    ok_reads = [r for r in recorder.reads if r.ok]
    if ok_reads:
        edges = np.arange(0, int(max(r.t for r in ok_reads)) + 2, 1.0)
        bottom = np.zeros(len(edges) - 1)
        for version in sorted(by_version):
            counts, _ = np.histogram([r.t for r in ok_reads if r.version == version], bins=edges)
            ax_reads.bar(edges[:-1], counts, width=1.0, bottom=bottom, align="edge",
                         label=f"reads/s served by {version}")
            bottom += counts
    ax_reads.set_ylabel("reads/s")
    spans = [(span, color) for span, color in ((shadow, "tab:cyan"), (rollout, "tab:orange"))
             if span is not None]
    for (start, end, text), color in spans:
        for ax in (ax_lat, ax_reads):
            ax.axvspan(start, end, color=color, alpha=0.15, zorder=0)
        ax_reads.annotate(text, (start, 1.0), xycoords=("data", "axes fraction"),
                          xytext=(2, -2), textcoords="offset points", va="top", fontsize=8,
                          color="black")

    for kind, color, y in (("edit", "tab:blue", 1), ("insert", "tab:orange", 0)):
        times = [w.t for w in recorder.writes if w.kind == kind]
        ax_w.scatter(times, [y] * len(times), marker="|", s=80, color=color,
                     label=f"{kind}s ({len(times)})")
    ax_w.set_yticks([0, 1], ["insert", "edit"])
    ax_w.set_ylim(-0.7, 1.7)
    ax_w.set_xlabel("seconds since the demo started")

    for ax in (ax_cov, ax_lat, ax_reads, ax_w):
        if migrate_start is not None and migrate_end is not None:
            ax.axvspan(migrate_start, migrate_end, color="0.92", zorder=0)
        if flip_t is not None:
            ax.axvline(flip_t, color="red", linestyle="--", linewidth=1)
    if flip_t is not None:
        ax_cov.annotate(f"flip to {new_version}", (flip_t, 50), xytext=(5, 0),
                        textcoords="offset points", color="red")
    for ax in (ax_cov, ax_lat, ax_reads, ax_w):
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
