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

from .config import get_config
from .models import EmbeddingVersion

_snapshots: dict[str, tuple[float, EmbeddingVersion]] = {}
_lock = threading.Lock()


def get(target: str) -> EmbeddingVersion:
    """The active version of ``target``, at most ``ACTIVE_CACHE_TTL`` seconds old."""
    ttl = get_config().active_cache_ttl
    now = time.monotonic()
    with _lock:
        entry = _snapshots.get(target)
    if entry is not None and now - entry[0] < ttl:
        return entry[1]
    # Timestamped before the read, so a snapshot never outlives the bound.
    version = EmbeddingVersion.objects.active_for(target)
    if ttl > 0:
        with _lock:
            _snapshots[target] = (now, version)
    return version


def invalidate(target: str | None = None) -> None:
    """Forget this process's snapshot of ``target`` (of every target if None)."""
    with _lock:
        if target is None:
            _snapshots.clear()
        else:
            _snapshots.pop(target, None)
