"""The active version as seen by a serving process: a per-process snapshot with a short TTL.

Every search takes *one* snapshot of the active ``EmbeddingVersion`` and uses it both to embed the
query (that version's model) and to choose the column searched (that version's column), so a query
vector is never searched against another version's column, even while a flip is under way.

The switch bound: a search that starts more than ``EMBEDDINGS["ACTIVE_CACHE_TTL"]`` seconds
(default 1.0) after the flip's transaction committed uses the new version, in every process. The
process that runs the flip drops its snapshot when the transaction commits. A reader still on the
old snapshot reads a consistent result: the previous version stays ``standby`` and dual-written,
and ``drop`` refuses it for ``DROP_GRACE_PERIOD`` seconds.
"""

from __future__ import annotations

import threading
import time

from django.db.models import Q

from .config import get_config
from .models import EmbeddingVersion, State

_snapshots: dict[str, tuple[float, EmbeddingVersion]] = {}
_candidates: dict[str, tuple[float, EmbeddingVersion | None]] = {}
_lock = threading.Lock()


def get(target: str) -> EmbeddingVersion:
    """The active version of ``target``, at most ``ACTIVE_CACHE_TTL`` seconds old (read in one
    query with the target's shadow candidate)."""
    ttl = get_config().active_cache_ttl
    now = time.monotonic()
    with _lock:
        entry = _snapshots.get(target)
    if entry is not None and now - entry[0] < ttl:
        return entry[1]
    # Timestamped before the read, so a snapshot never outlives the bound.
    rows = list(EmbeddingVersion.objects.for_target(target)
                .filter(Q(state=State.ACTIVE) | Q(shadow_rate__gt=0)).order_by("pk"))
    version = next((row for row in rows if row.state == State.ACTIVE), None)
    if version is None:
        version = EmbeddingVersion.objects.active_for(target)  # raises its one-line error
    candidate = next((row for row in rows if row.shadow_rate > 0), None)
    if ttl > 0:
        with _lock:
            _snapshots[target] = (now, version)
            _candidates[target] = (now, candidate)
    return version


def shadow_candidate(target: str) -> EmbeddingVersion | None:
    """The version of ``target`` whose shadow reads are on (``embeddings_app.shadow``), or None;
    as old as the active version's snapshot at most."""
    ttl = get_config().active_cache_ttl
    with _lock:
        entry = _candidates.get(target)
    if entry is not None and time.monotonic() - entry[0] < ttl:
        return entry[1]
    return (EmbeddingVersion.objects.for_target(target).filter(shadow_rate__gt=0)
            .order_by("pk").first())


def invalidate(target: str | None = None) -> None:
    """Forget this process's snapshots of ``target`` (of every target if None)."""
    with _lock:
        if target is None:
            _snapshots.clear()
            _candidates.clear()
        else:
            _snapshots.pop(target, None)
            _candidates.pop(target, None)
