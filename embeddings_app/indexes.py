"""HNSW indexes on a version's vectors (in its column or its table), built without blocking writes.

``build()`` runs the store's concurrent HNSW index build (``sql_create_index``) with the operator class
of the version's storage and distance, and the version's ``hnsw_m`` / ``hnsw_ef_construction``. An INVALID
index (left by a failed or interrupted concurrent build) is detected in ``pg_index`` and rebuilt.
While it builds, a second connection polls ``pg_stat_progress_create_index`` for progress.

Large indexes (docs/cutover.md, "Large indexes"): before building, ``plan()`` estimates the memory
the HNSW graph needs (about 1.3 x rows x (8 + 4 x dimensions) bytes, pgvector#844; 2 bytes per
dimension for halfvec) and decides the build session's ``maintenance_work_mem`` and
``max_parallel_maintenance_workers``: the ``index`` flags, else ``EMBEDDINGS["INDEX_*"]``, else
the server's settings; workers are capped by the server's ``max_parallel_workers``. The plan warns
when the estimate exceeds the memory (the build then slows down sharply once the graph no longer
fits). ``build()`` sets both for its own session only (``set_config(..., false)``), reads them
back into the plan, relays the server's notices of the build (pgvector's "hnsw graph no longer
fits into maintenance_work_mem after N tuples") and resets them afterwards. One build of an index
at a time: a session-level advisory lock of the index refuses a second one (which would otherwise
take the build's not-yet-valid index for a failed one and drop it).
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from django.db import connection

from . import limits, stores
from .config import get_config
from .exceptions import Refused
from .models import EmbeddingVersion, State

__all__ = ["BuildPlan", "Progress", "build", "check_buildable", "index_name", "index_state",
           "memory_estimate", "plan"]

PROGRESS_INTERVAL = 0.5  # seconds between two reads of pg_stat_progress_create_index
# pgvector#844: an HNSW graph takes about this many times its vectors and neighbour ids.
ESTIMATE_FACTOR = 1.3
ELEMENT_BYTES: dict[str, float] = {"vector": 4, "halfvec": 2, "bit": 0.125}
BUILD_LOCK_NAMESPACE = 0x656D69  # "emi": the first key of the index builds' advisory locks
SESSION_SETTINGS = ("maintenance_work_mem", "max_parallel_maintenance_workers")
SQL_SERVER_SETTINGS = ("SELECT name, setting FROM pg_settings WHERE name IN ("
                       "'maintenance_work_mem', 'max_parallel_maintenance_workers', "
                       "'max_parallel_workers', 'max_worker_processes')")
SQL_SET_SESSION = "SELECT set_config(%s, %s, false)"  # this session, until reset
SQL_CURRENT = "SELECT current_setting('maintenance_work_mem'), " \
              "current_setting('max_parallel_maintenance_workers')"
SQL_RESET = "RESET maintenance_work_mem; RESET max_parallel_maintenance_workers"
SQL_TRY_LOCK = "SELECT pg_try_advisory_lock(%s, %s)"
SQL_UNLOCK = "SELECT pg_advisory_unlock(%s, %s)"


def memory_estimate(rows: int, dimensions: int, storage: str = "vector") -> int:
    """Bytes an HNSW graph of ``rows`` vectors needs in memory to build fast (pgvector#844)."""
    return int(ESTIMATE_FACTOR * rows * (8 + ELEMENT_BYTES.get(storage, 4) * dimensions))


def size_label(size: int) -> str:
    """``size`` bytes in PostgreSQL's units, rounded up: ``381MB``, ``2GB``."""
    for unit, factor in (("TB", 1024 ** 4), ("GB", 1024 ** 3), ("MB", 1024 ** 2)):
        if size >= factor:
            whole = -(-size // factor)
            return f"{whole}{unit}"
    return f"{-(-size // 1024)}kB"


@dataclass
class BuildPlan:
    """What a build will use, decided before it starts (``plan``)."""

    version: str
    rows: int
    dimensions: int
    storage: str
    estimate: int  # bytes
    maintenance_work_mem_kb: int
    memory_source: str  # the flag, the setting, or "the server's setting"
    parallel_workers: int
    workers_source: str
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # Read back from the build's session once set, and the server's notices during the build.
    session: dict[str, str] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        element = ELEMENT_BYTES.get(self.storage, 4)
        return [
            f"Index memory estimate for {self.version}: 1.3 x {self.rows:,} rows x (8 + {element} "
            f"x {self.dimensions}) bytes = {size_label(self.estimate)} (pgvector#844).",
            f"Build session: maintenance_work_mem {size_label(self.maintenance_work_mem_kb * 1024)}"
            f" ({self.memory_source}), max_parallel_maintenance_workers {self.parallel_workers} "
            f"({self.workers_source}).",
            *self.notes,
        ]


def plan(version: EmbeddingVersion, *, maintenance_work_mem: str | int | None = None,
         parallel_workers: int | None = None) -> BuildPlan:
    """The memory estimate and the session settings of a build of ``version``'s index (see the
    module docstring). Refuses an out-of-bounds flag or setting before anything is read."""
    config = get_config()
    memory_kb = workers = None
    memory_source = workers_source = "the server's setting"
    if maintenance_work_mem is not None:
        memory_kb = limits.memory_kb("The build's maintenance_work_mem", maintenance_work_mem,
                                     "maintenance_work_mem")
        memory_source = "--maintenance-work-mem"
    elif config.index_maintenance_work_mem is not None:
        memory_kb = limits.memory_kb('EMBEDDINGS["INDEX_MAINTENANCE_WORK_MEM"]',
                                     config.index_maintenance_work_mem)
        memory_source = 'EMBEDDINGS["INDEX_MAINTENANCE_WORK_MEM"]'
    if parallel_workers is not None:
        workers = limits.integer("The build's parallel workers", parallel_workers,
                                 *limits.PARALLEL_MAINTENANCE_WORKERS, "parallel_workers")
        workers_source = "--parallel-workers"
    elif config.index_parallel_workers is not None:
        workers = config.index_parallel_workers
        workers_source = 'EMBEDDINGS["INDEX_PARALLEL_WORKERS"]'
    with connection.cursor() as cursor:
        cursor.execute(SQL_SERVER_SETTINGS)
        server = {name: int(value) for name, value in cursor.fetchall()}
    notes: list[str] = []
    if memory_kb is None:
        memory_kb = server["maintenance_work_mem"]  # pg_settings reports it in kB
    if workers is None:
        workers = server["max_parallel_maintenance_workers"]
    elif workers > server["max_parallel_workers"]:
        notes.append(f"Parallel workers capped at {server['max_parallel_workers']}: the "
                     f"server's max_parallel_workers (of max_worker_processes "
                     f"{server['max_worker_processes']}); {workers} were asked for.")
        workers = server["max_parallel_workers"]
    rows = version.store.vector_count()
    estimate = memory_estimate(rows, version.dimensions, version.storage)
    built = BuildPlan(str(version), rows, int(version.dimensions), version.storage, estimate,
                      memory_kb, memory_source, workers, workers_source, notes)
    if estimate > memory_kb * 1024:
        built.warnings.append(
            f"The estimate ({size_label(estimate)}) exceeds maintenance_work_mem "
            f"({size_label(memory_kb * 1024)}): once the graph no longer fits, the build slows "
            f"down sharply. Give it --maintenance-work-mem {size_label(estimate)} (or "
            f'EMBEDDINGS["INDEX_MAINTENANCE_WORK_MEM"]) if the server has the memory.')
    return built


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


def check_buildable(version: EmbeddingVersion) -> None:
    """Refuse to index a version whose vectors are not kept."""
    if version.state in (State.DROPPED, State.RETIRED):
        raise Refused(f"{version} is {version.state}; its vectors are not kept, nothing to index.")


def build(version: EmbeddingVersion, *, m: int | None = None, ef_construction: int | None = None,
          progress: Callable[[Progress], None] | None = None,
          maintenance_work_mem: str | int | None = None, parallel_workers: int | None = None,
          on_plan: Callable[[BuildPlan], None] | None = None) -> str:
    """Build the version's HNSW index concurrently (an INVALID leftover of a failed build is
    dropped first).

    ``m`` / ``ef_construction`` default to the version's ``hnsw_m`` / ``hnsw_ef_construction``;
    given, they are stored on the version. ``progress`` is called with each progress reading;
    ``on_plan`` with the build's plan (``plan``) before it starts, and again, with the settings
    read back from the session and the server's notices, when it has finished.
    """
    check_buildable(version)
    if connection.in_atomic_block:
        raise Refused("index cannot run inside a transaction (it builds concurrently).")
    limits.hnsw(version.hnsw_m if m is None else m,
                version.hnsw_ef_construction if ef_construction is None else ef_construction)
    if maintenance_work_mem is not None:  # every flag is checked before anything is read
        limits.memory_kb("The build's maintenance_work_mem", maintenance_work_mem,
                                     "maintenance_work_mem")
    if parallel_workers is not None:
        limits.integer("The build's parallel workers", parallel_workers,
                       *limits.PARALLEL_MAINTENANCE_WORKERS, "parallel_workers")
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
    lock = build_lock_key(name)
    with connection.cursor() as cursor:
        cursor.execute(SQL_TRY_LOCK, lock)
        if not cursor.fetchone()[0]:
            raise Refused(f"Index {name} of {version} is being built by another session; wait "
                          "for it (`embeddings status` and the admin show its progress).")
    try:
        state = index_state(version)  # again, now that no other build can be under way
        if state == "valid" and not changed:
            return name
        built = plan(version, maintenance_work_mem=maintenance_work_mem,
                     parallel_workers=parallel_workers)
        if on_plan is not None:
            on_plan(built)
        if changed:
            version.save(update_fields=changed)
        _build(store, state, built, progress)
        if on_plan is not None:
            on_plan(built)
    finally:
        with connection.cursor() as cursor:
            cursor.execute(SQL_UNLOCK, lock)
    if index_state(version) != "valid":
        raise Refused(f"{version}: index {name} is not valid after the build; run index again.")
    return name


def build_lock_key(name: str) -> list[int]:
    """The two keys of the advisory lock a build of index ``name`` holds."""
    return [BUILD_LOCK_NAMESPACE, _signed32(zlib.crc32(name.encode()))]


def _signed32(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value


def _build(store: stores.VersionStore, state: str, built: BuildPlan,
           progress: Callable[[Progress], None] | None) -> None:
    """The build itself, in this session with the plan's settings (reset afterwards)."""
    connection.ensure_connection()
    raw = connection.connection

    def notice(diagnostic: object) -> None:  # e.g. pgvector's "hnsw graph no longer fits ..."
        built.notices.append(str(getattr(diagnostic, "message_primary", diagnostic)))

    raw.add_notice_handler(notice)
    try:
        with connection.cursor() as cursor:
            cursor.execute(SQL_SET_SESSION, ["maintenance_work_mem",
                                             f"{built.maintenance_work_mem_kb}kB"])
            cursor.execute(SQL_SET_SESSION, ["max_parallel_maintenance_workers",
                                             str(built.parallel_workers)])
            cursor.execute(SQL_CURRENT)
            built.session = dict(zip(SESSION_SETTINGS, cursor.fetchone(), strict=True))
            if state != "none":  # invalid, or valid with other build parameters
                cursor.execute(store.drop_index_sql())
            poller = _ProgressPoller(store.index_progress_query(), progress) if progress else None
            try:
                cursor.execute(store.create_index_sql())
            finally:
                if poller is not None:
                    poller.stop()
    finally:
        raw.remove_notice_handler(notice)
        if not raw.closed:
            with connection.cursor() as cursor:
                cursor.execute(SQL_RESET)


class _ProgressPoller:
    """Runs the store's progress query (``pg_stat_progress_create_index``) from its own
    connection."""

    def __init__(self, query: tuple[str, list[str]], callback: Callable[[Progress], None]) -> None:
        self.query = query
        self.callback = callback
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="index-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from django.db import connection as thread_connection  # this thread's own connection

        try:
            while not self._stop.wait(PROGRESS_INTERVAL):
                with thread_connection.cursor() as cursor:
                    cursor.execute(*self.query)
                    row = cursor.fetchone()
                if row is not None:
                    self.callback(Progress(row[0], *(int(value or 0) for value in row[1:])))
        finally:
            thread_connection.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
