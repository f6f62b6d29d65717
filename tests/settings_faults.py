"""Test settings with a short batch lease, for the worker processes of tests/test_backfill_faults.py
(the test process sets the same value with the ``settings`` fixture)."""

from tests.settings import *  # noqa: F403
from tests.settings import EMBEDDINGS

BATCH_LEASE = 3.0  # seconds: a killed worker's batch is reclaimed within seconds
EMBEDDINGS = {**EMBEDDINGS, "BATCH_LEASE": BATCH_LEASE}
