"""``python -m benchmarks [NAME ...]`` (``make bench``): run the benchmarks, print one table and
write JSON under benchmarks/results/. Each benchmark also runs alone:
``python -m benchmarks.<name> --help``."""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks import harness

ALL = ["backfill", "search", "layout", "dualwrite", "memory", "cutover", "precision",
       "api_backfill", "index_build", "capture", "derive", "shadow", "chunks", "chunks_quality"]


def main() -> None:
    names = sys.argv[1:] or ALL
    unknown = [name for name in names if name not in ALL]
    if unknown:
        raise SystemExit(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(ALL)}")
    rows: list[harness.Row] = []
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        # Each in its own process, as when run alone: a benchmark changes its process (the
        # near-free encoder replaces inference), which must not leak into the next one.
        subprocess.run([sys.executable, "-m", f"benchmarks.{name}"], check=True)
        result = json.loads((harness.RESULTS_DIR / f"{name}.json").read_text())
        rows.extend(harness.Row(**row) for row in result["rows"])
    print("\n=== summary ===")
    harness.print_table(rows)
    print("results:", harness.write_json("all", rows))


if __name__ == "__main__":
    main()
