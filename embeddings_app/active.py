"""The active version as seen by a serving process: a per-process snapshot with a short TTL.

Every search takes *one* snapshot of the active ``EmbeddingVersion`` and uses it both to embed the
query (that version's model) and to choose the column searched (that version's column), so a query
vector is never searched against another version's column, even while a flip is under way.

The switch bound: a search that starts more than ``EMBEDDINGS["ACTIVE_CACHE_TTL"]`` seconds
(default 1.0) after the flip's transaction committed uses the new version, in every process. The
process that runs the flip drops its snapshot when the transaction commits. A reader still on the
old snapshot reads a consistent result: the previous version stays ``standby`` and dual-written,
and ``drop`` refuses it for ``DROP_GRACE_PERIOD`` seconds.

The same snapshot names the target's shadow candidate and rollout candidate (``Snapshot``), so
the version a search is served by, and whether it is shadowed, come from one read.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from django.db.models import Q

from .config import get_config
from .models import EmbeddingVersion, State


@dataclass(frozen=True)
class Snapshot:
    """What a serving process knows of a target, all from one read: the active version, the
    version whose shadow reads are on (``embeddings_app.shadow``) and the version serving a
    share of the searches in a gradual rollout (``embeddings_app.rollout``)."""

    active: EmbeddingVersion
    shadow: EmbeddingVersion | None
    rollout: EmbeddingVersion | None


_snapshots: dict[str, tuple[float, Snapshot]] = {}
_lock = threading.Lock()


def snapshot(target: str) -> Snapshot:
    """``target``'s snapshot, at most ``ACTIVE_CACHE_TTL`` seconds old (one query to refresh)."""
    ttl = get_config().active_cache_ttl
    now = time.monotonic()
    with _lock:
        entry = _snapshots.get(target)
    if entry is not None and now - entry[0] < ttl:
        return entry[1]
    # Timestamped before the read, so a snapshot never outlives the bound.
    rows = list(EmbeddingVersion.objects.for_target(target)
                .filter(Q(state=State.ACTIVE) | Q(shadow_rate__gt=0) | Q(rollout_percent__gt=0))
                .order_by("pk"))
    version = next((row for row in rows if row.state == State.ACTIVE), None)
    if version is None:
        version = EmbeddingVersion.objects.active_for(target)  # raises its one-line error
    taken = Snapshot(active=version,
                     shadow=next((row for row in rows if row.shadow_rate > 0), None),
                     rollout=next((row for row in rows if row.rollout_percent > 0), None))
    if ttl > 0:
        with _lock:
            _snapshots[target] = (now, taken)
    return taken


def get(target: str) -> EmbeddingVersion:
    """The active version of ``target``, at most ``ACTIVE_CACHE_TTL`` seconds old."""
    return snapshot(target).active


def invalidate(target: str | None = None) -> None:
    """Forget this process's snapshots of ``target`` (of every target if None)."""
    with _lock:
        if target is None:
            _snapshots.clear()
        else:
            _snapshots.pop(target, None)
