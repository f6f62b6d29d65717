"""Gradual rollout: a ready version serves a share of the searches beside the active one
(``embeddings activate TARGET VERSION --percent P``), then ``--percent 100`` completes the flip.

Invariants:

* **One search, one version.** ``serving`` picks the version of a search once, from the
  process's snapshot of the target (``active``: the active version and the rollout candidate,
  read in one query, at most ``ACTIVE_CACHE_TTL`` old); the query is embedded with that
  version's model and its store searched (``search``), as for any search.
* **Sticky per caller.** With ``key`` (a user or session id), the choice is a hash of the target
  and the key into 100 buckets: the same caller gets the same version at a given percent, and a
  higher percent only moves callers to the candidate. Without a key, each search draws.
* **The database keeps the shape**: one active version per target, at most one candidate beside
  it, which is ready (so dual-written like any written version) and below 100 percent
  (``embeddings_one_rollout_candidate``, ``embeddings_rollout_of_a_ready_version_below_100``).
* **Rollback is instant at any step**: it sets the percent to 0 under the lifecycle lock; every
  process serves the active version alone within ``ACTIVE_CACHE_TTL`` of the commit. A candidate
  whose rollout ended counts as deactivated then, so ``drop``'s grace period applies to it.
* **Reads per version are counted** while a rollout is on, per process in memory, added to the
  hourly ``ServedReads`` rows at most every ``FLUSH_SECONDS`` (a statement per version then),
  never per search; outside a rollout a search costs nothing more.
"""

from __future__ import annotations

import random
import threading
import time
import zlib
from collections import defaultdict
from datetime import timedelta

from django.db.models import Sum
from django.utils import timezone

from . import active
from .models import EmbeddingVersion, ServedReads, add_to_hour, current_hour

__all__ = ["FLUSH_SECONDS", "bucket", "flush", "has_pending", "note_read", "reads",
           "reads_line", "serving"]

FLUSH_SECONDS = 5.0


def bucket(target: str, key: object) -> int:
    """0..99, the same for the same target and key in every process (CRC-32 of both)."""
    return zlib.crc32(f"{target}\x00{key}".encode()) % 100


def serving(snapshot: active.Snapshot, target: str, key: object = None) -> EmbeddingVersion:
    """The version of ``snapshot`` that answers one search of ``target`` (for ``key``)."""
    candidate = snapshot.rollout
    if candidate is None or candidate.pk == snapshot.active.pk:
        return snapshot.active
    draw = bucket(target, key) if key is not None else random.randrange(100)
    return candidate if draw < candidate.rollout_percent else snapshot.active


# --- reads per version --------------------------------------------------------------------
_pending: dict[int, list[float]] = defaultdict(lambda: [0, 0.0])
_lock = threading.Lock()
_last_flush = [time.monotonic()]


def note_read(version: EmbeddingVersion, seconds: float) -> None:
    """Count one search served by ``version``; flush this process's counts when due."""
    with _lock:
        counts = _pending[version.pk]
        counts[0] += 1
        counts[1] += seconds
        due = time.monotonic() - _last_flush[0] >= FLUSH_SECONDS
    if due:
        flush()


def has_pending() -> bool:
    return bool(_pending)


def flush() -> None:
    """Add this process's counts to the hourly rows (one statement per version)."""
    with _lock:
        pending = dict(_pending)
        _pending.clear()
        _last_flush[0] = time.monotonic()
    hour = current_hour()
    for version_id, (count, seconds) in pending.items():
        add_to_hour(ServedReads, version_id, hour, reads=int(count), seconds=seconds)


def reads(target: str, hours: int = 24) -> list[tuple[str, int, float]]:
    """(version name, reads, mean seconds) of each version of ``target`` that served reads in
    the last ``hours``, by version name."""
    since = timezone.now() - timedelta(hours=hours)
    rows = (ServedReads.objects.filter(version__target=target, hour__gte=since)
            .values("version__version").annotate(reads=Sum("reads"), seconds=Sum("seconds"))
            .order_by("version__version"))
    return [(row["version__version"], row["reads"], row["seconds"] / row["reads"])
            for row in rows if row["reads"]]


def reads_line(target: str, hours: int = 24) -> str | None:
    """Reads per version of ``target`` over the last ``hours``, with their mean time."""
    parts = [f"{name} {count} (mean {seconds * 1000:.1f} ms)"
             for name, count, seconds in reads(target, hours)]
    if not parts:
        return None
    return f"{target}: reads in the last {hours} h: " + ", ".join(parts)
