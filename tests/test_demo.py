"""The README's first command, end to end in a reduced size: `manage.py demo --no-serve` as a
subprocess with its own data folder (its own embedded PostgreSQL and Redis, its own Celery
workers), then its JSON report, its chart and its processes checked; twice, both runs at once,
shared by this module's tests: the default (v2 chunked, in a table of its own) and ``--whole-rows``
(v2 as whole rows, in a column of the article table)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = int(os.environ.get("DEMO_TEST_DOCS", "80"))

# About two minutes per run on an idle machine with v2 as whole rows; far more on a loaded one
# (seven under a load of 11). The default run's chunked v2 encodes ~5 chunks per article: 642 s
# against 517 s for the --whole-rows run beside it under a load of 4 to 10, 389 s against 309 s
# under a load of 2 to 5 (both runs' own report.json, total_seconds).
DEMO_TIMEOUT = 1200
pytestmark = pytest.mark.timeout(DEMO_TIMEOUT + 120)


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


@dataclass
class DemoRun:
    name: str
    layout: str  # v2's, as the run's arguments ask
    data: Path
    report: dict[str, Any]
    log: str
    elapsed: float


# Each run: its demo arguments and v2's layout they give.
RUNS = {"default": ([], "table"), "whole-rows": (["--whole-rows"], "column")}


@dataclass
class _Started:
    name: str
    data: Path
    log: Path
    process: subprocess.Popen
    started: float


def _start(name: str, tmp_path_factory: pytest.TempPathFactory) -> _Started:
    tmp_path = tmp_path_factory.mktemp(f"demo-{name}")
    data = tmp_path / "data"
    env = {key: value for key, value in os.environ.items()
           if key not in ("DATABASE_URL", "CELERY_BROKER_URL", "DJANGO_SETTINGS_MODULE",
                          "XDG_RUNTIME_DIR")}
    env.update({"EMBEDDINGS_DATA_DIR": str(data), "HF_HUB_OFFLINE": "1",
                "DJANGO_SETTINGS_MODULE": "project.settings"})
    log = tmp_path / "demo.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "demo", "--docs", str(DOCS), "--no-serve",
             "--phase-seconds", "4", *RUNS[name][0]],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    return _Started(name, data, log, process, time.monotonic())


def _finish(run: _Started) -> DemoRun | str:
    """The run's report, or why it failed (its log's end)."""
    try:
        run.process.wait(timeout=max(DEMO_TIMEOUT - (time.monotonic() - run.started), 1))
    except subprocess.TimeoutExpired:
        _interrupt(run.process)
        return (f"demo ({run.name}) did not finish in {DEMO_TIMEOUT} s:\n"
                + run.log.read_text(errors="replace")[-4000:])
    text = run.log.read_text(errors="replace")
    if run.process.returncode != 0:
        return f"demo ({run.name}) exited {run.process.returncode}:\n{text[-4000:]}"
    report = json.loads((run.data / "demo" / "report.json").read_text())
    return DemoRun(run.name, RUNS[run.name][1], run.data, report, text,
                   time.monotonic() - run.started)


def _interrupt(process: subprocess.Popen) -> None:
    """Ctrl-C: the demo stops its traffic and its Celery workers."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DemoRun | str]:
    """Both runs at once, each with its own data folder, servers and workers (each spends much
    of its time waiting: servers starting, its traffic phases, its workers): about 1.4 times one
    run instead of two runs one after the other."""
    started = [_start(name, tmp_path_factory) for name in RUNS]
    try:
        return {run.name: _finish(run) for run in started}
    finally:
        for run in started:
            _interrupt(run.process)


@pytest.fixture(params=list(RUNS))
def demo(request: pytest.FixtureRequest, demo_runs: dict[str, DemoRun | str]) -> DemoRun:
    """One of the two runs (default: v2 chunked; ``--whole-rows``), shared by this module's
    tests."""
    run = demo_runs[request.param]
    if isinstance(run, str):
        pytest.fail(run)
    return run


def test_demo_end_to_end(demo: DemoRun) -> None:
    report = demo.report
    assert report["docs"] >= DOCS
    # Reads never failed, before, during and after the flip, and each phase had reads.
    assert report["failed_reads"] == 0, report["read_errors"]
    for name in ("before", "during", "shadow", "rollout", "after"):
        assert report["phases"][name]["reads"] > 0, name
        assert report["phases"][name]["failed_reads"] == 0, name
    # v1 alone serves until the rollout (v2 is only shadowed), both during it, v2 after the flip.
    for name in ("before", "during", "shadow"):
        assert set(report["phases"][name]["served_by"]) == {"v1"}, name
    assert set(report["phases"]["rollout"]["served_by"]) == {"v1", "v2"}
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
    # The old version is gone: state dropped, its column absent; v2 where its layout puts it.
    assert report["v1_dropped"] is True
    assert report["layout"] == {"v1": "column", "v2": demo.layout}
    assert "embedding_v1" not in report["columns_now"]
    assert ("embedding_v2" in report["columns_now"]) == (demo.layout == "column")
    # v2 chunked by default (chunks of 126 tokens, no overlap), whole rows with --whole-rows;
    # verify (step 4) passed on a sample of chunks, or of whole-row vectors.
    chunked = demo.name == "default"
    assert report["chunks"]["v2"] == ({"tokens": 126, "overlap": 0} if chunked else None)
    checked = report["verify"]["v2"]
    assert checked["passed"] is True and checked["compared"] > 0, checked
    assert checked["min_cosine"] >= 0.99, checked
    assert all((" chunk at " in key) == chunked for key in checked["worst"]), checked
    assert f"  verify v2 (step 4, before it served): passed, {checked['compared']} sampled " + (
        "chunks (of 126 tokens)" if chunked else "whole-row vectors") in demo.log
    # compare ran on the real models (its recall@10 is printed below, whatever it measured).
    assert report["compare"]["available"] is True, report["compare"]
    chart = Path(report["chart"])
    assert chart.is_file() and chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert chart.stat().st_size > 10_000
    # Every process the demo started is gone (celery; postgres and redis of its data folder).
    deadline = time.monotonic() + 15
    while _processes_using(demo.data) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_using(demo.data) == []
    print(f"demo --docs {DOCS} ({demo.name}, v2 in a {demo.layout}): {demo.elapsed:.0f} s; "
          f"v2 {report['rows_per_second']['v2']} rows/s; compare recall@10 v1, v2: "
          f"{report['compare'].get('recall@10')}, nDCG@10 {report['compare'].get('nDCG@10')}")


def test_the_demo_reports_table_sizes_before_after_the_backfill_and_after_the_drop(
        demo: DemoRun) -> None:
    """v2 in a side table puts its vectors in a table of their own and none in the article
    table (the default, chunked v2: one vector per chunk, and its rows' hashes in a second table,
    ``__rows``); a column v2 grows the article table by at least its vectors. Dropping v1 removes
    its HNSW index from the article table; v2 is untouched.

    The article table still grows while v2 is migrated in a side table: the demo's live traffic
    (an edit or insert every 3 s) writes v1, a column, so each write is a new row version and a
    new entry in v1's HNSW index (measured: 0.66 -> 0.77 MB, 1.16x, for 33 writes). Not the
    issue's 1.05x, which is about v2's backfill alone (benchmarks/layout.py: 1.00x at 100,000
    rows, without traffic); here the growth is bounded by the writes instead."""
    sizes = demo.report["sizes"]
    article = "news_article"
    side = "news_article_embedding_v2"
    tables = {article, side, f"{side}__rows"} if demo.report["chunks"]["v2"] else {article, side}
    v2_bytes = demo.report["docs"] * 768 * 4  # the v2 vectors alone (all-mpnet: 768 float32)
    assert set(sizes["before"]) == {article}, sizes  # v2 not added yet
    grown = sizes["after_backfill"][article] - sizes["before"][article]
    if demo.layout == "table":
        assert set(sizes["after_backfill"]) == set(sizes["after_drop"]) == tables, sizes
        assert sizes["after_backfill"][side] >= v2_bytes, sizes
        # Each write: a row version (~2 KB: v1's 384 floats and the text) and an HNSW entry
        # (~2 KB), within a page of 8 KiB; 64 KiB for the free-space and visibility maps
        # autovacuum may add. Far below v2's own table, which the article table would otherwise
        # have grown by.
        allowance = 64 * 1024 + 8192 * demo.report["writes"]["during_migration"]
        assert allowance < sizes["after_backfill"][side], (allowance, sizes)
        assert grown <= allowance, (grown, allowance, sizes)
        assert sizes["after_drop"][side] >= sizes["after_backfill"][side], sizes
    else:
        assert set(sizes["after_backfill"]) == set(sizes["after_drop"]) == {article}, sizes
        assert grown >= v2_bytes, sizes
    # The drop of v1 (a column) takes its HNSW index off the article table.
    assert sizes["after_drop"][article] < sizes["after_backfill"][article], sizes
    # The demo prints them, with each version's layout.
    assert f"Table sizes (v1 in its column, v2 in its {demo.layout})" in demo.log
    for when in ("before", "after_backfill", "after_drop"):
        assert f"  {when:15} {article} {sizes[when][article] / 1e6:.2f} MB" in demo.log, when


def test_the_demo_shows_how_many_rows_each_model_truncates(demo: DemoRun) -> None:
    """Both models' truncation figures, counted by compare on the same rows with each model's
    tokenizer: all-MiniLM-L6-v2 reads 256 tokens, all-mpnet-base-v2 (as pinned here) 128, so
    more of the BBC articles exceed v2's limit than v1's, and the report says so beside recall:
    cut by a whole-row v2; embedded as several chunks by the default, chunked v2, which cuts
    none."""
    figures = demo.report["truncation"]
    v1, v2 = figures["v1"], figures["v2"]
    assert (v1["limit"], v2["limit"]) == (256, 128), figures
    assert v1["by"] == v2["by"] == "compare", figures
    assert v1["sampled"] == v2["sampled"] == v1["rows"] == v2["rows"] > 0, figures  # all counted
    assert v1["counted"] == v2["counted"] > 0, figures
    assert 0 < v1["over"] / v1["counted"] < v2["over"] / v2["counted"], figures
    assert v2["median_overflow"] > 0, figures
    chunked = demo.name == "default"
    assert (v1["chunked"], v2["chunked"]) == (None, 126 if chunked else None), figures
    assert v2["summary"].startswith("no row cut: chunks of 126 tokens (") == chunked, figures
    for name in ("v1", "v2"):
        assert f"  {name} ({figures[name]['alias']}): {figures[name]['summary']}" in demo.log
    compare_lines = demo.report["compare"]["lines"]
    row = next(line for line in compare_lines if line.startswith("truncated "))
    assert ">256" in row and ("0% chunked:126" if chunked else ">128") in row, compare_lines


def test_the_demo_shadows_live_searches_then_rolls_v2_out_to_10_percent_then_flips(
        demo: DemoRun) -> None:
    """Before v2 serves anything, the workers answer a share of the live searches with it too
    (shadow reads, recorded as ShadowBucket sums); then it serves 10% of the searches, sticky
    per simulated user, beside v1; then all of them. The report, the printed report and the
    chart say so."""
    report = demo.report
    shadow = report["shadow"]
    assert shadow["rate"] == 0.5
    # Recorded by the demo's Celery workers, never more than the searches v1 served meanwhile.
    assert 0 < shadow["queries"] <= shadow["v1_reads_meanwhile"], shadow
    assert shadow["queries_by_rollout"] <= shadow["queries"], shadow
    assert 0.0 <= shadow["mean_overlap_at_10"] <= 1.0, shadow
    rank = shadow["mean_rank_correlation"]
    assert rank is None or -1.0 <= rank <= 1.0, shadow
    assert shadow["candidate_ms"] > 0 and shadow["served_ms"] > 0, shadow
    assert shadow["unranked_rows"] >= 0, shadow
    assert f"  {shadow['summary']}" in demo.log
    assert report["shadow_s"] < report["rollout_s"] < report["flip_s"], report
    rollout = report["rollout"]
    assert rollout["percent"] == 10
    assert rollout["served_by"] == {
        name: report["phases"]["rollout"]["served_by"].get(name, 0) for name in ("v1", "v2")}
    assert min(rollout["served_by"].values()) > 0, rollout
    # Sticky: once every process saw the rollout, no simulated user got both versions.
    assert rollout["users"] > 0 and rollout["users_on_both_versions"] == [], rollout
    assert "Rollout: v2 served 10% of the searches (sticky per user)" in demo.log
    for step in ("[5/7] shadow v2 --rate 0.5", "[6/7] activate v2 --percent 10",
                 "[7/7] activate v2"):
        assert step in demo.log, step


@pytest.mark.parametrize(("arguments", "refusal"), [
    (["--chunks", "100", "--layout", "column"], "A chunked v2 lives in a table of its own"),
    (["--whole-rows", "--overlap", "16"], "--overlap applies to a chunked v2 only"),
    (["--layout", "column", "--overlap", "16"], "--overlap applies to a chunked v2 only"),
    (["--whole-rows", "--chunks", "100"], "--whole-rows and --chunks 100 contradict"),
    (["--chunks", "-1"], "--chunks must be a positive number of tokens"),
])
def test_the_demo_refuses_chunk_options_add_would_refuse_before_it_starts_anything(
        arguments: list[str], refusal: str) -> None:
    """``--chunks``/``--overlap``/``--whole-rows`` that ``add`` would refuse only after v1's
    migration, or that contradict each other, are refused at once, in one line, before a data
    folder, a server or a worker is touched."""
    from django.core.management import CommandError, call_command

    with pytest.raises(CommandError, match=refusal):
        call_command("demo", "--no-serve", *arguments)


@pytest.mark.parametrize(("arguments", "shape"), [
    ([], ("table", 126, 0)),
    (["--overlap", "16"], ("table", 126, 16)),
    (["--chunks", "100"], ("table", 100, 0)),
    (["--layout", "table", "--chunks", "100", "--overlap", "8"], ("table", 100, 8)),
    (["--whole-rows"], ("column", None, None)),
    (["--chunks", "0"], ("column", None, None)),
    (["--layout", "column"], ("column", None, None)),
    (["--whole-rows", "--layout", "table"], ("table", None, None)),
])
def test_v2_is_chunked_in_a_table_by_default_and_whole_rows_with_whole_rows_or_a_column(
        arguments: list[str], shape: tuple[str, int | None, int | None]) -> None:
    """v2's layout, chunk size and overlap as the demo's options give them: chunks of 126
    tokens, no overlap, in a table of its own unless told otherwise; whole rows (no chunk size)
    with ``--whole-rows``, ``--chunks 0`` or ``--layout column``, in a column unless told
    otherwise."""
    from django.core.management import load_command_class

    from project.news.management.commands.demo import v2_shape

    command = load_command_class("project.news", "demo")
    options = vars(command.create_parser("manage.py", "demo").parse_args(arguments))
    assert v2_shape(options["layout"], options["chunks"], options["overlap"],
                    options["whole_rows"]) == shape
