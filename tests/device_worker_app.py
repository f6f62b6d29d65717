"""The project's Celery app for worker tests that look inside the worker's encoder (``-A
tests.device_worker_app``): each model the worker loads logs the device and precision its
parameters are on, and gets a forward hook that logs the number of texts of each pass, to the
worker log (tests/test_devices.py)."""

from __future__ import annotations

import logging
from typing import Any

from embeddings_app import encoders
from project.celery import app

__all__ = ["app"]

PASS_LOG = "forward pass of %d texts"
LOAD_LOG = "loaded %s on %s at %s"
logger = logging.getLogger("tests.device_worker_app")
_load_uncached = encoders._load_uncached


def _load_counting(*args: Any, **kwargs: Any) -> encoders.SentenceTransformersEncoder:
    encoder = _load_uncached(*args, **kwargs)
    parameter = next(encoder.model.parameters())
    logger.warning(LOAD_LOG, encoder.spec.alias, parameter.device, parameter.dtype)

    def log_pass(module: Any, inputs: Any, output: dict[str, Any]) -> None:
        logger.warning(PASS_LOG, output["sentence_embedding"].shape[0])

    encoder.model.register_forward_hook(log_pass)
    return encoder


# Replaced in the parent before the pool forks: each child process loads through it.
encoders._load_uncached = _load_counting
