"""The README's first command, end to end in a reduced size: `manage.py demo --no-serve` as a
subprocess with its own data folder (its own embedded PostgreSQL and Redis, its own Celery
workers), then its JSON report, its chart and its processes checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = int(os.environ.get("DEMO_TEST_DOCS", "80"))

pytestmark = pytest.mark.timeout(420)


def _processes_using(folder: Path) -> list[str]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            environ = proc.environ() if "celery" in cmdline else {}
            cwd = proc.cwd()  # the embedded redis-server runs in the data folder
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if (str(folder) in cmdline or environ.get("EMBEDDINGS_DATA_DIR") == str(folder)
                or cwd.startswith(str(folder))):
            found.append(f"{proc.info['pid']}: {cmdline[:160]}")
    return found


def test_demo_end_to_end(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {key: value for key, value in os.environ.items()
           if key not in ("DATABASE_URL", "CELERY_BROKER_URL", "DJANGO_SETTINGS_MODULE",
                          "XDG_RUNTIME_DIR")}
    env.update({"EMBEDDINGS_DATA_DIR": str(data), "HF_HUB_OFFLINE": "1",
                "DJANGO_SETTINGS_MODULE": "project.settings"})
    log = tmp_path / "demo.log"
    started = time.monotonic()
    with log.open("w") as out:
        process = subprocess.run(
            [sys.executable, "manage.py", "demo", "--docs", str(DOCS), "--no-serve",
             "--phase-seconds", "4"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=400,
        )
    text = log.read_text(errors="replace")
    assert process.returncode == 0, text[-4000:]
    elapsed = time.monotonic() - started

    report = json.loads((data / "demo" / "report.json").read_text())
    assert report["docs"] >= DOCS
    # Reads never failed, before, during and after the flip, and each phase had reads.
    assert report["failed_reads"] == 0, report["read_errors"]
    for name in ("before", "during", "after"):
        assert report["phases"][name]["reads"] > 0, name
        assert report["phases"][name]["failed_reads"] == 0, name
    assert set(report["phases"]["before"]["served_by"]) == {"v1"}
    assert set(report["phases"]["during"]["served_by"]) == {"v1"}
    assert report["phases"]["after"]["served_by"].get("v2", 0) > 0
    # This process switches to v2 at most ACTIVE_CACHE_TTL after the flip (+ one read's time).
    switch = report["switch"]
    if switch["v1_reads_after_flip"]:
        assert switch["last_v1_read_after_flip_s"] <= switch["active_cache_ttl_s"] + 2.0
    # Rows were written during the migration, and every written row has a fresh v2 vector.
    assert report["writes"]["during_migration"] > 0
    assert report["writes"]["failed"] == 0
    fresh = report["freshness"]
    assert fresh["checked"] > 0
    assert fresh["all_fresh"] is True
    assert fresh["v2"]["fresh"] == fresh["checked"]
    assert fresh["v2"]["min_cosine"] >= 0.999
    # The old version is gone: state dropped, its column absent.
    assert report["v1_dropped"] is True
    assert "embedding_v1" not in report["columns_now"]
    assert "embedding_v2" in report["columns_now"]
    # compare ran on the real models.
    assert report["compare"]["available"] is True, report["compare"]
    chart = Path(report["chart"])
    assert chart.is_file() and chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert chart.stat().st_size > 10_000
    # Every process the demo started is gone (celery; postgres and redis of its data folder).
    deadline = time.monotonic() + 15
    while _processes_using(data) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_using(data) == []
    print(f"demo --docs {DOCS}: {elapsed:.0f} s; v2 {report['rows_per_second']['v2']} rows/s")
