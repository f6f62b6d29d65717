"""The project's Celery app for benchmark workers whose encoder is the near-free table lookup of
``harness.use_near_free_encoder`` (the database-bound write path on worker processes):
``celery -A benchmarks.near_free_worker worker``, with ``BENCH_NEAR_FREE_DIMENSIONS`` set."""

from __future__ import annotations

import os
from typing import Any

from celery.signals import worker_process_init

from project.celery import app

__all__ = ["app"]


@worker_process_init.connect
def _use_near_free_encoder(**_: Any) -> None:
    from benchmarks import harness

    harness.use_near_free_encoder(dimensions=int(os.environ["BENCH_NEAR_FREE_DIMENSIONS"]))
