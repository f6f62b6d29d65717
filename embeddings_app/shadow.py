"""Shadow reads: a sampled share of live searches is also answered by a candidate version, off
the request path, and the two answers are compared (docs/cutover.md, "Shadow reads").

``embeddings shadow TARGET VERSION --rate R`` sets the candidate's ``shadow_rate``. A search that
the active version served (``search.search``, a plain search: no ``queryset``) is, with
probability R, sent as a task carrying the query text and the served keys; a worker embeds the
text with the candidate's own model, searches the candidate's store for the same k, and adds the
comparison to the candidate's hourly ``ShadowBucket``.

Invariants:

* **The user's read pays at most an enqueue, in memory.** The served results are computed and
  returned as without shadowing; the candidate is named by the search's snapshot
  (``active.Snapshot``, refreshed at most ``ACTIVE_CACHE_TTL`` late). A sampled search puts its
  task on the process's bounded publish queue (``PUBLISH_QUEUE_SIZE``) and returns; one daemon
  thread per process publishes to the broker, up to ``PUBLISH_BATCH`` samples a message, a
  sample waiting at most ``PUBLISH_INTERVAL`` seconds for others. A full queue (a broker slower
  than the searches) drops the sample, counted and logged; a broker that refuses a task is
  logged, never raised. At process exit the thread gets ``EXIT_FLUSH_SECONDS`` to publish what
  is queued; what is left is lost, as a lost shadow read is one sample fewer, never a wrong
  figure.
* **No query text is kept.** The task carries it to the worker; the buckets keep sums only.
* **Shadowing ends at activate, rollback, retire and drop** (``lifecycle.transition`` sets every
  rate of the target to 0 in the step's transaction), and a task that reaches a worker after
  that records nothing: it re-reads the rate first. At most one version of a target is shadowed.
* **The comparison is the served answer's**: overlap@k is |served ∩ candidate| / max(|served|,
  |candidate|); the rank correlation is Spearman's over the rows both ranked (two or more);
  a served row the candidate could not rank is one with no fresh vector in the candidate's store
  (missing, or of an older text).
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import random
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
from django.db.models import Sum

from . import encoders, stores
from .config import get_config
from .exceptions import Refused
from .models import EmbeddingVersion, ShadowBucket, State, add_to_hour, current_hour
from .sources import source_hash

if TYPE_CHECKING:
    from .fields import VersionedEmbedding

__all__ = ["KEEP_HOURS", "PUBLISH_BATCH", "PUBLISH_INTERVAL", "PUBLISH_QUEUE_SIZE",
           "SHADOWABLE_STATES", "ShadowSummary", "flush", "gate_problems", "maybe_shadow",
           "overlap", "rank_correlation", "record", "start", "stop", "summary"]

logger = logging.getLogger(__name__)

KEEP_HOURS = 24 * 14  # hourly buckets kept per candidate: two weeks
# A candidate must be complete and kept fresh: a ready version, or the standby one.
SHADOWABLE_STATES = (State.READY, State.STANDBY)
PUBLISH_QUEUE_SIZE = 1000  # shadow tasks waiting for the broker, per process
PUBLISH_INTERVAL = 1.0  # seconds a sample may wait for others to share its message
PUBLISH_BATCH = 50  # samples per message at most
EXIT_FLUSH_SECONDS = 2.0


# --- on the request path ------------------------------------------------------------------
class _Publisher:
    """The process's publish queue and the daemon thread that empties it into the broker, in
    batches: the thread takes what is queued, waits up to ``PUBLISH_INTERVAL`` seconds for more
    (at most ``PUBLISH_BATCH`` samples) and sends them as one task, so the broker sees a few
    messages a second whatever the search rate, and the process's CPU and GIL are taken by a
    publish that often, not once per sampled search. Made again in a forked child (a web
    server's or Celery's workers): a thread does not survive a fork, and the parent's queue may
    have been copied mid-operation."""

    _FLUSH = ("flush",)  # put by flush(): publish what is batched now, without the wait

    def __init__(self) -> None:
        self._pid = 0
        self._guard = threading.Lock()
        self._queue: queue.Queue[tuple] = queue.Queue(PUBLISH_QUEUE_SIZE)
        self.dropped = 0

    def submit(self, task: tuple) -> bool:
        if self._pid != os.getpid():
            self._start()
        try:
            self._queue.put_nowait(task)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % PUBLISH_QUEUE_SIZE == 0:
                logger.warning("shadow reads dropped: %d so far (the broker is slower than the "
                               "searches; lower the shadow rate)", self.dropped)
            return False
        return True

    def flush(self, timeout: float) -> bool:
        """Publish the queued tasks now and wait up to ``timeout`` seconds for them to be sent
        (or to fail); True when none is left."""
        deadline = time.monotonic() + timeout
        if self._pid == os.getpid() and self._queue.unfinished_tasks:
            try:
                self._queue.put(self._FLUSH, timeout=timeout)
            except queue.Full:
                return False
        while self._pid == os.getpid() and self._queue.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def _start(self) -> None:
        with self._guard:
            if self._pid == os.getpid():
                return
            self._queue = queue.Queue(PUBLISH_QUEUE_SIZE)
            threading.Thread(target=self._run, args=(self._queue,), daemon=True,
                             name="embeddings-shadow-publisher").start()
            self._pid = os.getpid()

    @classmethod
    def _run(cls, tasks_queue: queue.Queue[tuple]) -> None:
        from . import tasks  # load-bearing lazy import: tasks imports search's callers (lifecycle)

        while True:
            taken = [tasks_queue.get()]
            deadline = time.monotonic() + PUBLISH_INTERVAL
            while taken[-1] is not cls._FLUSH and len(taken) < PUBLISH_BATCH:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    taken.append(tasks_queue.get(timeout=remaining))
                except queue.Empty:
                    break
            batch = [task for task in taken if task is not cls._FLUSH]
            try:
                if batch:
                    tasks.send_shadow_reads(batch)
            except Exception:  # the broker's failure is samples fewer
                logger.warning("%d shadow reads not sent", len(batch), exc_info=True)
            finally:
                for _ in taken:
                    tasks_queue.task_done()


_publisher = _Publisher()
atexit.register(_publisher.flush, EXIT_FLUSH_SECONDS)


def flush(timeout: float = 10.0) -> bool:
    """Publish this process's queued shadow reads now (tests, a clean shutdown); True when the
    queue is empty."""
    return _publisher.flush(timeout)


def maybe_shadow(field: VersionedEmbedding, candidate: EmbeddingVersion | None,
                 served: EmbeddingVersion, text: str, k: int, results: list[Any],
                 served_seconds: float) -> bool:
    """After a plain search served by ``served``: queue it for the shadowed ``candidate`` (of
    the search's snapshot) with its probability. True when it was queued."""
    if candidate is None or candidate.pk == served.pk or random.random() >= candidate.shadow_rate:
        return False
    return _publisher.submit((candidate.pk, text, k, [str(obj.pk) for obj in results],
                              served_seconds))


# --- on a worker --------------------------------------------------------------------------
def overlap(served: list[str], candidate: list[str]) -> float:
    """|served ∩ candidate| / max(|served|, |candidate|) (1.0 when both are empty)."""
    size = max(len(served), len(candidate))
    return len(set(served) & set(candidate)) / size if size else 1.0


def rank_correlation(served: list[str], candidate: list[str]) -> float | None:
    """Spearman's rank correlation of the rows both lists rank, by their order in each; None
    with fewer than two such rows."""
    position = {key: rank for rank, key in enumerate(candidate)}
    common = [key for key in served if key in position]
    if len(common) < 2:
        return None
    served_ranks = np.arange(len(common), dtype=float)
    candidate_ranks = np.argsort(np.argsort([position[key] for key in common])).astype(float)
    n = len(common)
    return float(1 - 6 * np.sum((served_ranks - candidate_ranks) ** 2) / (n * (n * n - 1)))


def record(candidate_pk: int, text: str, k: int, served_keys: list[str],
           served_seconds: float) -> dict[str, Any] | None:
    """Answer ``text`` with the candidate, compare with the served keys and add the result to
    the candidate's bucket of this hour; None (nothing recorded) when shadowing has ended."""
    from . import registry, search  # load-bearing lazy import: search imports this module

    candidate = EmbeddingVersion.objects.filter(pk=candidate_pk).first()
    if candidate is None or candidate.shadow_rate <= 0 or candidate.state not in SHADOWABLE_STATES:
        return None
    field = registry.get(candidate.target)
    started = time.perf_counter()
    vector = encoders.for_version(candidate).encode_query(text)
    rows = search._nearest(field, candidate, vector, k, None)
    candidate_seconds = time.perf_counter() - started
    candidate_keys = [str(obj.pk) for obj in rows]
    figures = {
        "overlap": overlap(served_keys, candidate_keys),
        "rank": rank_correlation(served_keys, candidate_keys),
        "unranked": len(unranked(field, candidate, served_keys)),
        "served_seconds": served_seconds,
        "candidate_seconds": candidate_seconds,
    }
    hour = current_hour()
    rank = figures["rank"]
    created = add_to_hour(
        ShadowBucket, candidate.pk, hour, queries=1, overlap_sum=figures["overlap"],
        rank_sum=rank if rank is not None else 0.0, rank_queries=1 if rank is not None else 0,
        served_seconds=served_seconds, candidate_seconds=candidate_seconds,
        unranked_rows=figures["unranked"])
    if created:
        ShadowBucket.objects.filter(version=candidate,
                                    hour__lt=hour - timedelta(hours=KEEP_HOURS)).delete()
    return figures


def unranked(field: VersionedEmbedding, candidate: EmbeddingVersion,
             keys: list[str]) -> list[str]:
    """The served rows (``keys``, still present) without a fresh vector in ``candidate``."""
    objects = {str(obj.pk): obj for obj in field.model._default_manager.filter(pk__in=keys)}
    stored = stores.stored_hashes(field, [candidate], [obj.pk for obj in objects.values()])
    return [key for key, obj in objects.items()
            if stored.get(obj.pk, (None,))[0] != source_hash(field.source_text(obj))]


# --- operators ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ShadowSummary:
    version: str
    rate: float
    queries: int
    mean_overlap: float | None
    mean_rank: float | None
    served_seconds: float | None  # mean
    candidate_seconds: float | None  # mean
    unranked_rows: int

    def line(self) -> str:
        if not self.queries:
            return (f"{self.version}: shadow {self._rate()}, no shadow queries recorded yet")
        rank = "n/a" if self.mean_rank is None else f"{self.mean_rank:.2f}"
        assert self.served_seconds is not None and self.candidate_seconds is not None
        ratio = (self.candidate_seconds / self.served_seconds if self.served_seconds
                 else float("nan"))
        return (f"{self.version}: shadow {self._rate()}, {self.queries} queries, overlap@k "
                f"{self.mean_overlap:.3f}, rank correlation {rank}, latency "
                f"{self.candidate_seconds * 1000:.1f} ms against {self.served_seconds * 1000:.1f}"
                f" ms served ({ratio:.2f}x), {self.unranked_rows} served rows unranked")

    def _rate(self) -> str:
        return f"at {self.rate:.0%}" if self.rate > 0 else "off"


def summary(version: EmbeddingVersion) -> ShadowSummary:
    totals = ShadowBucket.objects.filter(version=version).aggregate(
        queries=Sum("queries"), overlap=Sum("overlap_sum"), rank=Sum("rank_sum"),
        rank_queries=Sum("rank_queries"), served=Sum("served_seconds"),
        candidate=Sum("candidate_seconds"), unranked=Sum("unranked_rows"))
    queries = totals["queries"] or 0
    rank_queries = totals["rank_queries"] or 0
    return ShadowSummary(
        version=str(version), rate=version.shadow_rate, queries=queries,
        mean_overlap=totals["overlap"] / queries if queries else None,
        mean_rank=totals["rank"] / rank_queries if rank_queries else None,
        served_seconds=totals["served"] / queries if queries else None,
        candidate_seconds=totals["candidate"] / queries if queries else None,
        unranked_rows=totals["unranked"] or 0)


def start(target: str, version_name: str, rate: float, *, actor: str = "") -> EmbeddingVersion:
    """Shadow ``rate`` (0 < rate <= 1) of the target's plain searches with ``version_name``; the
    target's other versions stop being shadowed."""
    from . import lifecycle  # load-bearing lazy import: lifecycle imports this module

    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
        raise Refused(f"The shadow rate must be a share of searches in (0, 1], e.g. 0.1, not "
                      f"{rate!r}.", option="rate")
    record_ = EmbeddingVersion.objects.get_version(target, version_name)
    with lifecycle.locked_versions(target) as versions:
        version = lifecycle.locked_version(target, versions, record_)
        if version.state not in SHADOWABLE_STATES:
            raise Refused(
                f"{version} is {version.state}; only a ready or standby version (complete and "
                "kept fresh) can be shadowed: finish its backfill first.")
        for other in versions.values():
            if other.pk != version.pk and other.shadow_rate:
                other.shadow_rate = 0.0
                other.save(update_fields=["shadow_rate"])
        version.shadow_rate = float(rate)
        version.save(update_fields=["shadow_rate"])
        lifecycle.record_event(version, actor=actor,
                               note=f"shadow reads at {rate:.0%} of plain searches")
        lifecycle.forget_snapshot(target)
    return version


def stop(target: str, *, actor: str = "") -> list[EmbeddingVersion]:
    """Turn shadow reads of ``target`` off; the versions that were shadowed."""
    from . import lifecycle  # load-bearing lazy import: lifecycle imports this module

    stopped = []
    with lifecycle.locked_versions(target) as versions:
        for version in versions.values():
            if version.shadow_rate:
                version.shadow_rate = 0.0
                version.save(update_fields=["shadow_rate"])
                lifecycle.record_event(version, actor=actor, note="shadow reads off")
                stopped.append(version)
        lifecycle.forget_snapshot(target)
    return stopped


def gate_problems(version: EmbeddingVersion) -> list[str]:
    """The shadow gate of ``activate`` (``SHADOW_MIN_QUERIES``, ``SHADOW_MIN_OVERLAP``): why
    ``version`` may not be activated yet, with the measured figures."""
    config = get_config()
    if not config.shadow_min_queries and config.shadow_min_overlap is None:
        return []
    seen = summary(version)
    hint = (f"run `manage.py embeddings shadow {version.target} {version.version} --rate 0.1` "
            "and let live searches reach it")
    problems = []
    if seen.queries < config.shadow_min_queries:
        problems.append(f"{version} has {seen.queries} shadow queries, fewer than "
                        f'EMBEDDINGS["SHADOW_MIN_QUERIES"] = {config.shadow_min_queries}; {hint}.')
    if config.shadow_min_overlap is None:
        return problems
    if not seen.queries:
        if not problems:  # the count's line already says to shadow it
            problems.append(f"{version} has no shadow queries to measure its overlap against "
                            f'EMBEDDINGS["SHADOW_MIN_OVERLAP"]; {hint}.')
    elif seen.mean_overlap < config.shadow_min_overlap:
        problems.append(f"{version}'s mean shadow overlap@k is {seen.mean_overlap:.3f} over "
                        f"{seen.queries} queries, below EMBEDDINGS[\"SHADOW_MIN_OVERLAP\"] = "
                        f"{config.shadow_min_overlap}: its answers differ from the served ones.")
    return problems
