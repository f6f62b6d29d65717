"""HNSW indexes on a version's vectors (in its column or its table), built without blocking writes.

``build()`` runs the store's ``CREATE INDEX CONCURRENTLY ... USING hnsw`` with the operator class
of the version's storage and distance, and the version's ``hnsw_m`` / ``hnsw_ef_construction``. An INVALID
index (left by a failed or interrupted concurrent build) is detected in ``pg_index`` and rebuilt.
While it builds, a second connection polls ``pg_stat_progress_create_index`` for progress.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from django.db import connection

from . import limits, stores
from .exceptions import Refused
from .models import EmbeddingVersion, State

PROGRESS_INTERVAL = 0.5  # seconds between two reads of pg_stat_progress_create_index


@dataclass(frozen=True)
class Progress:
    """One row of ``pg_stat_progress_create_index`` for the build."""

    phase: str
    blocks_done: int
    blocks_total: int
    tuples_done: int
    tuples_total: int

    @property
    def fraction(self) -> float | None:
        if self.tuples_total:
            return self.tuples_done / self.tuples_total
        if self.blocks_total:
            return self.blocks_done / self.blocks_total
        return None


def index_name(version: EmbeddingVersion) -> str:
    return version.store.index_name()


def opclass(version: EmbeddingVersion) -> str:
    return version.store.opclass()


def index_state(version: EmbeddingVersion) -> str:
    """"valid", "invalid" (a failed concurrent build), or "none"."""
    if version.state == State.DROPPED:
        return "none"
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT x.indisvalid FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
            "WHERE i.relname = %s",
            [index_name(version)],
        )
        row = cursor.fetchone()
    if row is None:
        return "none"
    return "valid" if row[0] else "invalid"


def build(version: EmbeddingVersion, *, m: int | None = None, ef_construction: int | None = None,
          progress: Callable[[Progress], None] | None = None) -> str:
    """CREATE INDEX CONCURRENTLY (an INVALID leftover of a failed build is dropped first).

    ``m`` / ``ef_construction`` default to the version's ``hnsw_m`` / ``hnsw_ef_construction``;
    given, they are stored on the version. ``progress`` is called with each progress reading.
    """
    if version.state in (State.DROPPED, State.RETIRED):
        raise Refused(f"{version} is {version.state}; its vectors are not kept, nothing to index.")
    if connection.in_atomic_block:
        raise Refused("index cannot run inside a transaction (it builds concurrently).")
    limits.hnsw(version.hnsw_m if m is None else m,
                version.hnsw_ef_construction if ef_construction is None else ef_construction)
    changed = []
    if m is not None and m != version.hnsw_m:
        version.hnsw_m = m
        changed.append("hnsw_m")
    if ef_construction is not None and ef_construction != version.hnsw_ef_construction:
        version.hnsw_ef_construction = ef_construction
        changed.append("hnsw_ef_construction")
    store = version.store
    name = store.index_name()
    state = index_state(version)
    if state == "valid" and not changed:
        return name
    if changed:
        version.save(update_fields=changed)
    with connection.cursor() as cursor:
        if state != "none":  # invalid, or valid with other build parameters
            cursor.execute(store.drop_index_sql())
        poller = _ProgressPoller(store.relation, progress) if progress else None
        try:
            cursor.execute(store.create_index_sql())
        finally:
            if poller is not None:
                poller.stop()
    if index_state(version) != "valid":
        raise Refused(f"{version}: index {name} is not valid after the build; run index again.")
    return name


class _ProgressPoller:
    """Reads ``pg_stat_progress_create_index`` for ``table`` from its own connection."""

    def __init__(self, table: str, callback: Callable[[Progress], None]) -> None:
        self.table = table
        self.callback = callback
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="index-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from django.db import connection as thread_connection  # this thread's own connection

        try:
            while not self._stop.wait(PROGRESS_INTERVAL):
                with thread_connection.cursor() as cursor:
                    cursor.execute(
                        "SELECT phase, blocks_done, blocks_total, tuples_done, tuples_total "
                        "FROM pg_stat_progress_create_index WHERE relid = %s::regclass",
                        [stores.qn(self.table)],
                    )
                    row = cursor.fetchone()
                if row is not None:
                    self.callback(Progress(row[0], *(int(value or 0) for value in row[1:])))
        finally:
            thread_connection.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
