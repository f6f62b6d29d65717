"""The bounds of every number an operator or a caller gives the app, checked in the library so
the command, the admin and the Python API refuse the same input with the same line, before
anything changes.

Where a bound comes from:

* HNSW parameters: pgvector's own (``hnsw.ef_search`` 1..1000, ``m`` 2..100, ``ef_construction``
  4..1000 and at least ``2 * m``). A stored ``ef_search`` outside them makes every search fail.
* ``MAX_BATCH_SIZE`` rows per backfill batch and ``MAX_K`` results per search or comparison: ours,
  far above any useful value, so a typo cannot ask the database for millions of rows at once.
* a verify threshold is a cosine similarity a sampled vector must reach: finite, in (0, 1].
* a query vector: finite, not all zeros (its cosine distance to anything is undefined), and of
  the version's dimension.
* an index build's ``maintenance_work_mem``: PostgreSQL's own range for the setting (1 MB to
  2147483647 kB), in its units (``kB``, ``MB``, ``GB``, ``TB``; a bare integer is MB); its
  parallel maintenance workers 0..1024 (PostgreSQL's range; the server's ``max_parallel_workers``
  caps them at build time, ``indexes.plan``).
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from .exceptions import Refused, VersionMismatch

HNSW_EF_SEARCH = (1, 1000)
HNSW_M = (2, 100)
HNSW_EF_CONSTRUCTION = (4, 1000)
MAX_BATCH_SIZE = 10_000
MAX_K = 1000
MAX_VERIFY_SAMPLE = 100_000
MAX_COMPARE_SAMPLE = 10_000
MAX_TRUNCATION_SAMPLE = 100_000  # rows tokenized by a truncation measurement
MAINTENANCE_WORK_MEM_KB = (1024, 2_147_483_647)  # PostgreSQL's bounds of the setting
PARALLEL_MAINTENANCE_WORKERS = (0, 1024)
MEMORY_UNITS_KB = {"kb": 1, "mb": 1024, "gb": 1024 ** 2, "tb": 1024 ** 3}
MEMORY = re.compile(r"\s*(\d+)\s*(kB|MB|GB|TB)?\s*", re.IGNORECASE)


def integer(name: str, value: Any, low: int, high: int, option: str | None = None) -> int:
    """``value`` if it is an integer in [low, high]; else a one-line refusal naming ``name``
    (words, not a flag) whose ``option`` is the keyword argument that passed it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not (
            low <= value <= high):
        raise Refused(f"{name} must be an integer from {low} to {high}, not {value!r}.",
                      option=option)
    return int(value)


def hnsw(m: int, ef_construction: int) -> None:
    integer("HNSW m", m, *HNSW_M)
    integer("HNSW ef_construction", ef_construction, *HNSW_EF_CONSTRUCTION)
    if ef_construction < 2 * m:
        raise Refused(f"HNSW ef_construction ({ef_construction}) must be at least 2 * m "
                      f"({2 * m}).")


def threshold(value: Any) -> float:
    """A cosine similarity threshold: a finite number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value) or not 0 < value <= 1:
        raise Refused(f"The verify threshold must be a cosine similarity in (0, 1], not "
                      f"{value!r}.")
    return float(value)


def query_vector(vector: Any, dimensions: int, version: str) -> np.ndarray:
    """``vector`` as float32 if it is a finite, non-zero vector of ``dimensions``."""
    try:
        array = np.asarray(vector, dtype=np.float32)
    except (TypeError, ValueError):
        raise VersionMismatch(f"The query vector is not a vector of numbers: {type(vector).__name__}."
                              ) from None
    if array.ndim != 1 or array.shape[0] != dimensions:
        raise VersionMismatch(
            f'The vector has shape {array.shape} but version "{version}" stores {dimensions} '
            "dimensions.")
    if not np.isfinite(array).all():
        raise VersionMismatch("The query vector has NaN or infinite values.")
    if not array.any():
        raise VersionMismatch("The query vector is all zeros: its cosine distance to any row is "
                              "undefined.")
    return array


def memory_kb(name: str, value: Any, option: str | None = None) -> int:
    """``value`` (an integer of MB, or a string such as ``"512MB"`` or ``"2GB"``) in kB, if it
    is within PostgreSQL's bounds of ``maintenance_work_mem``; else a one-line refusal."""
    low, high = MAINTENANCE_WORK_MEM_KB
    kb = None
    if isinstance(value, int) and not isinstance(value, bool):
        kb = value * 1024
    elif isinstance(value, str) and (found := MEMORY.fullmatch(value)):
        kb = int(found.group(1)) * MEMORY_UNITS_KB[(found.group(2) or "MB").lower()]
    if kb is None or not low <= kb <= high:
        raise Refused(f"{name} must be a memory size from 1MB to 2047GB (e.g. 512MB, 2GB; a "
                      f"bare number is MB), not {value!r}.", option=option)
    return kb
