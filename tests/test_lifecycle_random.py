"""Randomized operators (issue 12, tests): three processes issue random lifecycle steps (add,
backfill, index, verify, activate with and without --force, rollback, retire, drop) against the
versions of one target while reader threads search and writer threads save. Invariants are
checked continuously and at the end: at most one active version; the active and standby versions
have their columns and, after a final sweep, every row fresh (checked against a fresh encode); no
search fails or mixes versions; no save fails; every step succeeds or refuses with one line.

The seed is printed (``EMBEDDINGS_TEST_SEED=N`` replays the operators' choices)."""

from __future__ import annotations

import collections
import itertools
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection, connections

from embeddings_app import stores, tasks
from embeddings_app.models import BackfillRun, EmbeddingVersion, State
from project.news.models import Article
from tests.backfill_helpers import Writers, assert_every_row_fresh
from tests.conftest import TARGET
from tests.settings_random import ACTIVE_CACHE_TTL, DROP_GRACE_PERIOD
from tests.workers import ROOT, database_url

pytestmark = pytest.mark.django_db(transaction=True)

OPERATORS = 3
SECONDS = 30  # each operator's run (about 180 steps on an idle 2-core machine)
ROWS = 80
QUERIES = ["stock market shares", "football cup final", "mobile phone networks",
           "general election", "film award ceremony"]


class Readers:
    """Threads searching until stopped; every failure and every mixed result is recorded."""

    def __init__(self, count: int = 2) -> None:
        self.stop_event = threading.Event()
        self.searches = 0
        self.problems: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(count)]

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not self.stop_event.is_set():
                try:
                    found = Article.embedding.search(rng.choice(QUERIES), k=5)
                except Exception as exc:  # recorded: no search may fail
                    self.problems.append(f"search failed: {type(exc).__name__}: {exc}")
                    continue
                versions = {obj.embedding_version for obj in found}
                if len(versions) > 1:
                    self.problems.append(f"one search mixed versions {sorted(versions)}")
                self.searches += 1
                time.sleep(0.02)
        finally:
            connections.close_all()

    def start(self) -> Readers:
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(60)


class Monitor(threading.Thread):
    """Checks the invariants every 0.2 s from its own session: at most one active version, and
    the active and standby versions have their columns (the columns read first: a version
    active or standby at the second read had them at the first)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop_event = threading.Event()
        self.checks = 0
        self.violations: list[str] = []

    def run(self) -> None:
        try:
            while not self.stop_event.wait(0.2):
                columns = stores.existing_columns("news_article")
                states = list(EmbeddingVersion.objects.for_target(TARGET)
                              .values_list("version", "state", "column"))
                active = [name for name, state, _ in states if state == State.ACTIVE]
                if len(active) > 1:
                    self.violations.append(f"{len(active)} active versions: {active}")
                for name, state, column in states:
                    if state in (State.ACTIVE, State.STANDBY) and column not in columns:
                        self.violations.append(f"{name} is {state} without its column")
                self.checks += 1
        finally:
            connections.close_all()


def interleavings(steps: list[dict[str, Any]]) -> int:
    """Pairs of steps of different operators that ran at the same time."""
    return sum(1 for a, b in itertools.combinations(steps, 2)
               if a["operator"] != b["operator"] and a["start"] < b["end"]
               and b["start"] < a["end"])


def forced_live_incomplete() -> list[str]:
    """The active and standby versions whose last activation was forced from a state that is
    not complete (new, backfilling, failed) with no backfill run started after it and done."""
    names = []
    for version in EmbeddingVersion.objects.for_target(TARGET).filter(
            state__in=(State.ACTIVE, State.STANDBY)):
        forced = version.events.filter(
            to_state=State.ACTIVE, note__contains="(forced)",
            from_state__in=(State.NEW, State.BACKFILLING, State.FAILED)).last()
        if forced is not None and not version.runs.filter(
                started_at__gt=forced.at, status=BackfillRun.Status.DONE).exists():
            names.append(version.version)
    return names


@pytest.fixture
def three_versions(make_articles: Callable, settings: Any) -> None:
    settings.EMBEDDINGS = {**settings.EMBEDDINGS, "ACTIVE_CACHE_TTL": ACTIVE_CACHE_TTL,
                           "DROP_GRACE_PERIOD": DROP_GRACE_PERIOD}
    make_articles(ROWS)
    for name, alias in (("v1", "tiny"), ("v2", "tiny_other"), ("v3", "tiny")):
        call_command("embeddings", "add", TARGET, name, "--model", alias)
        call_command("embeddings", "backfill", TARGET, name, "--inline")
        call_command("embeddings", "index", TARGET, name)
        call_command("embeddings", "verify", TARGET, name)
    call_command("embeddings", "activate", TARGET, "v1")


def test_random_operators_readers_and_writers_never_break_an_invariant(three_versions):
    seed = int(os.environ.get("EMBEDDINGS_TEST_SEED", random.randrange(10**6)))
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings_random",
           "DATABASE_URL": database_url(), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    monitor = Monitor()
    monitor.start()
    readers = Readers().start()
    writers = Writers(Article, list(Article.objects.values_list("pk", flat=True)),
                      count=2, seed=seed).start()
    operators = [subprocess.Popen([sys.executable, "-m", "tests.random_operator",
                                   str(seed + i), str(SECONDS)], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(OPERATORS)]
    outputs = [process.communicate(timeout=SECONDS + 240) for process in operators]
    saves = writers.stop()  # raises the first failed save
    readers.stop()
    monitor.stop_event.set()
    monitor.join(60)

    steps = []
    for number, (process, (out, err)) in enumerate(zip(operators, outputs, strict=True)):
        assert process.returncode == 0, err[-3000:]
        steps += [{**json.loads(line), "operator": number} for line in out.splitlines()]
    counts = collections.Counter((step["kind"], step["outcome"]) for step in steps)
    print(f"\nseed {seed}: {len(steps)} steps by {OPERATORS} operators, "
          f"{interleavings(steps)} interleavings (steps of two operators at the same time), "
          f"{readers.searches} searches, {saves} saves, {monitor.checks} invariant checks")
    print("  " + ", ".join(f"{kind} {outcome}: {n}" for (kind, outcome), n in sorted(counts.items())))
    refusals = collections.Counter(f"{step['kind']}: {step['detail'].splitlines()[0][:110]}"
                                   for step in steps if step["outcome"] == "refused")
    for line, n in refusals.most_common(8):
        print(f"  refused {n}x {line}")
    errors = [step for step in steps if step["outcome"] == "error"]
    for step in errors[:3]:
        print(f"ERROR in {step['kind']} {step['args']}:\n{step['detail']}")
    assert not errors, f"{len(errors)} steps failed with a traceback (printed above)"
    assert not monitor.violations, monitor.violations[:5]
    assert not readers.problems, readers.problems[:5]
    assert readers.searches and saves
    assert sum(counts[(kind, "ok")] for kind in ("activate", "activate --force", "rollback")) >= 1

    # The end: after a sweep, the active and standby versions are complete and fresh; those
    # that an operator forced live while incomplete after a backfill of their own, which only
    # an operator starts (the sweep refreshes the rows written since, not the rows never
    # embedded).
    connection.close()
    for name in forced_live_incomplete():
        print(f"  {name} was forced live while incomplete: backfilled before the check")
        call_command("embeddings", "backfill", TARGET, name, "--inline")
    tasks.sweep(TARGET)
    final = dict(EmbeddingVersion.objects.for_target(TARGET).values_list("version", "state"))
    print(f"  final states: {final}")
    assert list(final.values()).count(State.ACTIVE) <= 1
    columns = stores.existing_columns("news_article")
    for version in EmbeddingVersion.objects.for_target(TARGET).filter(
            state__in=(State.ACTIVE, State.STANDBY)):
        assert {version.column, version.hash_column} <= columns
        try:
            assert assert_every_row_fresh(TARGET, version.version) == ROWS
        except AssertionError as exc:  # what happened to it, in the failure's own message
            history = [f"{event.at:%H:%M:%S.%f} {event} ({event.actor}: {event.note})"
                       for event in version.events.all()]
            history += [f"run {run.pk} {run.status} {run.started_at:%H:%M:%S.%f} to "
                        f"{run.finished_at and f'{run.finished_at:%H:%M:%S.%f}'} "
                        f"{run.last_error}" for run in version.runs.order_by("pk")]
            raise AssertionError(f"seed {seed}: {exc}\n" + "\n".join(history)) from exc
