"""Where this process computes vectors: its device, its precision and its encode batch size.

These belong to a worker *process*, never to the shared settings: the web processes and the CPU
workers of a site keep ``cpu`` while GPU workers serve the same queue. Each is read from the
environment of the process (docs/devices.md):

* ``EMBEDDINGS_DEVICE`` = ``cpu`` (default) | ``cuda`` | ``cuda:N`` | ``auto`` (``cuda`` when torch
  sees a CUDA device, else ``cpu``). One worker process per GPU: ``CUDA_VISIBLE_DEVICES=N``.
* ``EMBEDDINGS_PRECISION`` = ``float32`` | ``float16`` | ``bfloat16`` (default: each version's own
  precision, the alias's ``precision``). A process computing at another precision than a
  version's pin refuses to write it (``encoders.for_version``), unless the alias lists that
  precision in ``compatible_precisions`` and the version's probes agree within its tolerance.
* ``EMBEDDINGS_ENCODE_BATCH_SIZE`` = texts per forward pass (default: the alias's
  ``encode_batch_size`` for this device type). The database batch (``BATCH_SIZE``) stays the unit
  of work and progress; one database batch is encoded in forward passes of this size.

Invariant: an unknown or unavailable device is one clear ``DeviceError`` at worker start (the
``worker_init`` signal, connected by the app) and at model load, never a silent fall back to
another device. ``auto`` is the only value that may pick ``cpu``.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

from .config import PRECISIONS
from .exceptions import DeviceError

DEVICE_ENV = "EMBEDDINGS_DEVICE"
PRECISION_ENV = "EMBEDDINGS_PRECISION"
ENCODE_BATCH_SIZE_ENV = "EMBEDDINGS_ENCODE_BATCH_SIZE"
DEVICE_SYNTAX = re.compile(r"cpu|auto|cuda(?::(\d+))?")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessOptions:
    """This process's placement, from its environment."""

    device: str  # a torch device: "cpu", "cuda", "cuda:1"
    requested: str  # the value of EMBEDDINGS_DEVICE ("" when unset)
    precision: str | None  # None: each version's own precision
    encode_batch_size: int | None  # None: the alias's for this device type

    @property
    def device_type(self) -> str:
        return self.device.split(":", 1)[0]

    def describe(self) -> str:
        why = f" ({DEVICE_ENV}={self.requested})" if self.requested else f" ({DEVICE_ENV} unset)"
        precision = self.precision or "each version's own"
        batch = self.encode_batch_size or "the alias's for this device"
        return (f"embeddings: this process encodes on {self.device}{why}, precision {precision}, "
                f"encode batch size {batch}.")


def _cuda_device_count() -> int:
    # device_count() asks NVML first, so it does not initialise CUDA in a prefork parent
    # (torch's fork poisoning); a CPU build of torch answers 0.
    import torch  # lazy: web processes that never encode do not pay for torch

    return int(torch.cuda.device_count())


def resolve_device(value: str) -> str:
    """The torch device of ``EMBEDDINGS_DEVICE=value``; ``DeviceError`` if unknown or absent."""
    value = value.strip().lower()
    if not value:
        return "cpu"
    match = DEVICE_SYNTAX.fullmatch(value)
    if match is None:
        raise DeviceError(
            f"{DEVICE_ENV}={value!r} is not a device this app knows; use cpu, cuda, cuda:N "
            "(N counted among CUDA_VISIBLE_DEVICES) or auto.")
    if value == "cpu":
        return "cpu"
    count = _cuda_device_count()
    if value == "auto":
        return "cuda" if count else "cpu"
    index = int(match.group(1) or 0)
    if index >= count:
        seen = f"{count} CUDA device{'s' if count != 1 else ''}" if count else "no CUDA device"
        raise DeviceError(
            f"{DEVICE_ENV}={value} but torch sees {seen} in this process (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}, torch {_torch_version()}); "
            "start this worker where the GPU is visible, or with EMBEDDINGS_DEVICE=cpu or auto.")
    return value


def _torch_version() -> str:
    import torch  # lazy: web processes that never encode do not pay for torch

    return str(torch.__version__)


def current() -> ProcessOptions:
    """This process's options, read from its environment now (every model load asks, so a
    test or a command may change them; resolved once per distinct value)."""
    return _parse(os.environ.get(DEVICE_ENV, "").strip(),
                  os.environ.get(PRECISION_ENV, "").strip(),
                  os.environ.get(ENCODE_BATCH_SIZE_ENV, "").strip())


@functools.lru_cache(maxsize=8)  # errors are not cached: a bad value is reported at every load
def _parse(requested: str, precision_value: str, raw_batch: str) -> ProcessOptions:
    device = resolve_device(requested)
    precision = precision_value or None
    if precision is not None and precision not in PRECISIONS:
        raise DeviceError(f"{PRECISION_ENV}={precision!r} is not a precision; use one of "
                          f"{', '.join(PRECISIONS)}, or leave it unset for each version's own.")
    batch = None
    if raw_batch:
        if not raw_batch.isdigit() or int(raw_batch) < 1:
            raise DeviceError(f"{ENCODE_BATCH_SIZE_ENV}={raw_batch!r} must be a positive integer "
                              "(texts per forward pass), e.g. 256 on a GPU.")
        batch = int(raw_batch)
    return ProcessOptions(device, requested, precision, batch)


def on_worker_init(**_: Any) -> None:
    """Celery ``worker_init``: validate this worker's options before it takes any task. A bad
    value stops the worker with one line (``SystemExit``: Celery logs and swallows ordinary
    exceptions raised by signal handlers)."""
    try:
        current()
    except DeviceError as exc:
        raise SystemExit(f"embeddings: {exc}") from None


def on_worker_ready(**_: Any) -> None:
    """Celery ``worker_ready`` (its logging is set up by then): say where this worker encodes."""
    logger.info("%s", current().describe())
