"""Pinned models: the provider seam, offline loading (once per process), fingerprints, encoding.

``Encoder`` is the base of every provider: ``SentenceTransformersEncoder`` (a local folder) here,
``api.OpenAIEncoder`` (any OpenAI-compatible ``/v1/embeddings``) beside it. ``load(spec)`` picks
the provider named by the alias.

A local model's fingerprint is a SHA-256 over every file of the model folder (weights, tokenizer,
configs) and the encode settings; an API's, over its pinned identity (provider, base URL, model,
revision, dimensions, encode settings), since its files cannot be hashed: probe vectors stored
with the version (``probes``) catch a change behind an unchanged name. The fingerprint is stored
when a version is added and compared on every use, so vectors are never written or searched with
another model than the one the version was built with.

A local model runs on this process's device at its precision, in forward passes of its encode
batch size (``devices``: the worker's environment, never the shared settings). The precision is
part of the pin (the alias's ``precision``, in the encode settings unless float32): a process
computing at another precision refuses to write a version (``PrecisionMismatch``) unless the
alias accepts that precision and the version's probes agree. An out-of-memory error halves the
forward pass and retries the same texts at the same precision, down to one text; the device
failing even then (or lost) is ``DeviceUnavailable``, a transient error: the batch is retried,
nothing is written, no row is marked failed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from contextvars import ContextVar
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from . import devices
from .config import DEFAULT_PRECISION, ModelSpec, get_config
from .exceptions import (
    DeviceUnavailable,
    FingerprintMismatch,
    ModelLoadError,
    PrecisionMismatch,
    ProbeMismatch,
    ProviderUnavailable,
)

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from .models import EmbeddingVersion

# Files that do not change what the model computes.
_IGNORED_SUFFIXES = (".md", ".gitattributes", ".lock", ".incomplete")
# Seconds a provider may spend retrying transient failures (an API's 429s, 5xx, timeouts) within
# one encode call made in this context; None: the provider's default for documents. A save's
# dual-write sets a short one: a user is waiting, and a stale row is re-embedded by the sweep.
RETRY_BUDGET: ContextVar[float | None] = ContextVar("embeddings_retry_budget", default=None)
_DIMENSION_PROBE = "dimension probe"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileStat:
    path: str
    size: int
    mtime_ns: int


def resolve_model_path(spec: ModelSpec) -> Path:
    """The local folder of ``spec``: the directory itself, or the hub cache's snapshot of
    ``model@revision`` (never downloaded: models must be present locally)."""
    candidate = Path(spec.model).expanduser()
    if candidate.is_dir():
        return candidate.resolve()
    if candidate.is_absolute() or spec.model.startswith("."):
        raise ModelLoadError(
            f'Model folder "{spec.model}" of alias "{spec.alias}" does not exist; '
            "provision it or fix EMBEDDINGS[\"MODELS\"]."
        )
    from huggingface_hub import snapshot_download  # lazy: only a model not yet on disk needs it

    try:
        return Path(snapshot_download(spec.model, revision=spec.revision, local_files_only=True))
    except Exception as exc:  # huggingface_hub raises several unrelated types here
        raise ModelLoadError(
            f'Model "{spec.model}" at revision {spec.revision} is not in the local cache '
            f"({type(exc).__name__}); download it once where a hub is reachable, or point "
            '"model" at a local folder.'
        ) from exc


def model_files(folder: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith(".") or name.lower().endswith(_IGNORED_SUFFIXES):
                continue
            files.append(Path(root) / name)
    return files


def _stats(folder: Path) -> tuple[FileStat, ...]:
    result = []
    for path in model_files(folder):
        stat = path.stat()
        result.append(FileStat(str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns))
    return tuple(result)


def fingerprint(folder: Path, spec: ModelSpec) -> str:
    digest = hashlib.sha256()
    for path in model_files(folder):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    digest.update(json.dumps(spec.encode_settings(), sort_keys=True).encode())
    return digest.hexdigest()


class Encoder:
    """One pinned model of one provider: documents, queries, dimensions, fingerprint.

    The base keeps what every provider shares (the query cache, post-processing, counting);
    a provider subclass overrides one hook, ``_encode`` (texts and a prompt in, float32 vectors
    out; ``_encode_query`` defaults to it), and says which of its errors are transient
    (``transient_errors``). Invariant: a
    fingerprint names everything that changes the vectors, so equal fingerprints mean equal
    vectors (up to the provider's determinism, which probes measure)."""

    provider: ClassVar[str] = ""
    # Errors that mean "try again later", not "this input is bad" (see sync._encode_isolating).
    transient_errors: ClassVar[tuple[type[BaseException], ...]] = (ProviderUnavailable,)
    # The floating-point precision this process computes at; None where it is not ours to
    # choose (an API).
    precision: str | None = None

    def __init__(self, spec: ModelSpec, fingerprint: str) -> None:
        self.spec = spec
        self.fingerprint = fingerprint
        self.calls = 0  # encode calls (API: requests), for tests and benchmarks
        self._dimensions: int | None = None
        self._cache_lock = threading.Lock()
        # Query text -> vector. Per encoder, so per fingerprint: a cached vector can only ever
        # be reused with the exact model files and settings that produced it.
        self._query_cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def _encode(self, texts: list[str], prompt: str | None) -> np.ndarray:
        """The provider hook: the vectors of ``texts`` (with ``prompt`` put before each)."""
        raise NotImplementedError

    def _encode_query(self, text: str) -> np.ndarray:
        """The vector of one query (a provider may retry it differently from documents)."""
        return self._encode([text], self.spec.query_prompt)[0]

    @property
    def dimensions(self) -> int:
        if self._dimensions is None:
            self._dimensions = int(self._encode([_DIMENSION_PROBE], None).shape[1])
        return self._dimensions

    def library_versions(self) -> dict[str, str]:
        """Versions of the libraries that compute the vectors in this process (recorded at
        ``add``; a change triggers the probe comparison)."""
        return {}

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.empty((0, self.dimensions), dtype=np.float32)
        return self._encode(texts, self.spec.document_prompt)

    def clear_query_cache(self) -> None:
        with self._cache_lock:
            self._query_cache.clear()

    def encode_query(self, text: str) -> np.ndarray:
        size = get_config().query_cache_size
        with self._cache_lock:
            cached = self._query_cache.get(text)
            if cached is not None:
                self._query_cache.move_to_end(text)
                return cached.copy()
        vector = self._encode_query(text)
        if size:
            with self._cache_lock:
                self._query_cache[text] = vector.copy()
                while len(self._query_cache) > size:
                    self._query_cache.popitem(last=False)
        return vector


class SentenceTransformersEncoder(Encoder):
    """A local sentence-transformers folder, loaded once per process on its device at its
    precision; its fingerprint hashes the model files and the pinned encode settings."""

    provider = "sentence-transformers"

    def __init__(self, spec: ModelSpec, folder: Path, model: SentenceTransformer, fingerprint: str,
                 stats: tuple[FileStat, ...], options: devices.ProcessOptions | None = None
                 ) -> None:
        super().__init__(spec, fingerprint)
        options = options or devices.ProcessOptions("cpu", "", None, None)
        self.folder = folder
        self.model = model
        self.stats = stats
        self.device = options.device
        self.precision = options.precision or spec.precision
        # Texts per forward pass. sentence-transformers sorts the texts of one encode call by
        # length before cutting them into passes (SentenceTransformer.encode), so a pass pads
        # little: a database batch is handed over whole, never pre-sorted here.
        self.encode_batch_size = (options.encode_batch_size
                                  or spec.encode_batch_size_for(options.device_type))
        self._lock = threading.Lock()  # torch modules are not safe to run from many threads
        self.dimensions  # noqa: B018 -- measured at load, as before providers existed

    def _encode(self, texts: list[str], prompt: str | None) -> np.ndarray:
        import torch  # loaded with the model already; here for its error types

        with self._lock:
            self.calls += 1
            batch_size = self.encode_batch_size
            while True:
                try:
                    vectors = self.model.encode(
                        texts,
                        prompt=prompt,
                        batch_size=batch_size,
                        normalize_embeddings=self.spec.normalize,
                        truncate_dim=self.spec.truncate_dim,
                        convert_to_numpy=True,
                        show_progress_bar=False,
                    )
                    break
                except torch.OutOfMemoryError as exc:  # torch.cuda.OutOfMemoryError is this type
                    _release_device_memory(self.device)
                    if batch_size == 1:
                        raise DeviceUnavailable(
                            f"{self.device} ran out of memory encoding one text for alias "
                            f'"{self.spec.alias}" at {self.precision}; the batch will be retried '
                            "(lower max_seq_length, or run this alias on a larger device)."
                        ) from exc
                    batch_size = max(1, batch_size // 2)
                    logger.warning("out of memory on %s encoding %d texts; retrying them %d per "
                                   "forward pass", self.device, len(texts), batch_size)
                except torch.AcceleratorError as exc:  # a lost or failed device
                    forget(self)  # the next load builds the model again
                    raise DeviceUnavailable(
                        f"{self.device} failed encoding for alias '{self.spec.alias}' "
                        f"({type(exc).__name__}: {str(exc)[:200]}); the batch will be retried."
                    ) from exc
        return np.asarray(vectors, dtype=np.float32)

    def library_versions(self) -> dict[str, str]:
        return dict(local_library_versions())


def _release_device_memory(device: str) -> None:
    """Give back the blocks torch's caching allocator holds after an out-of-memory error."""
    import torch  # lazy: loaded with the model already; web processes never import it

    if device.startswith("cuda") and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@functools.cache  # installed packages do not change under a running process
def local_library_versions() -> dict[str, str]:
    found = {}
    for name in ("sentence-transformers", "transformers", "torch"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


_cache: dict[str, Encoder] = {}
_cache_lock = threading.Lock()


def load(spec: ModelSpec) -> Encoder:
    """The encoder of ``spec``, loaded once per process and reloaded if its files (or, for an
    API, its settings) or this process's device options change."""
    if spec.is_api:
        from .api import OpenAIEncoder  # lazy: the SDK is loaded only where an API is used

        with _cache_lock:
            cached = _cache.get(spec.alias)
            if cached is None or cached.spec != spec:
                cached = _cache[spec.alias] = OpenAIEncoder(spec)
            return cached
    options = devices.current()  # DeviceError: an unknown or absent device, before any work
    folder = resolve_model_path(spec)
    stats = _stats(folder)
    with _cache_lock:
        cached = _cache.get(spec.alias)
        if (isinstance(cached, SentenceTransformersEncoder) and cached.spec == spec
                and cached.folder == folder and cached.stats == stats
                and cached.device == options.device
                and cached.precision == (options.precision or spec.precision)
                and cached.encode_batch_size == (options.encode_batch_size
                                                 or spec.encode_batch_size_for(
                                                     options.device_type))):
            return cached
        encoder = _load_uncached(spec, folder, stats, options)
        _cache[spec.alias] = encoder
        return encoder


def _load_uncached(spec: ModelSpec, folder: Path, stats: tuple[FileStat, ...],
                   options: devices.ProcessOptions) -> SentenceTransformersEncoder:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Lazy, load-bearing: these libraries read HF_HUB_OFFLINE when imported (just set), and a
    # process that never encodes (a web process, an API-only worker) never pays for torch.
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # no "Loading weights" bar in command output

    precision = options.precision or spec.precision
    try:
        model = SentenceTransformer(str(folder), device=options.device, local_files_only=True)
        if precision != DEFAULT_PRECISION:
            model.to(dtype=getattr(torch, precision))
    except torch.OutOfMemoryError as exc:
        raise DeviceUnavailable(f"{options.device} has no memory left to load model "
                                f'"{spec.model}" at {precision}.') from exc
    except Exception as exc:
        raise ModelLoadError(
            f'Could not load model "{spec.model}" from {folder} on {options.device} at '
            f"{precision}: {type(exc).__name__}: {exc}"
        ) from exc
    if spec.max_seq_length is not None:
        model.max_seq_length = spec.max_seq_length
    return SentenceTransformersEncoder(spec, folder, model, fingerprint(folder, spec), stats,
                                       options)


def forget(encoder: Encoder) -> None:
    """Drop ``encoder`` from this process's cache (its device failed): the next use reloads."""
    with _cache_lock:
        if _cache.get(encoder.spec.alias) is encoder:
            del _cache[encoder.spec.alias]


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


def for_version(version: EmbeddingVersion) -> Encoder:
    """The encoder of ``version``'s pinned model; refuses model files other than the pinned ones."""
    spec = get_config().model(version.model_alias)
    # Only the content matters: the same files moved to another folder are the same model.
    encoder = load(spec)
    if encoder.fingerprint != version.fingerprint:
        now, then = spec.encode_settings(), dict(version.encode_settings or {})
        changed = sorted(key for key in {*now, *then} if now.get(key) != then.get(key))
        which = f" (encode settings changed: {', '.join(changed)})" if changed and then else ""
        raise FingerprintMismatch(
            f"{version}: the files or settings of model {version.model_label} changed since the "
            f"version was added{which} (fingerprint {encoder.fingerprint[:12]} != pinned "
            f"{version.fingerprint[:12]}); restore them, or add a new version for the new files."
        )
    pinned = (version.encode_settings or {}).get("precision", DEFAULT_PRECISION)
    if encoder.precision is not None and encoder.precision != pinned:
        if encoder.precision not in spec.compatible_precisions:
            raise PrecisionMismatch(
                f"{version} is pinned at {pinned} but this process computes at "
                f"{encoder.precision} ({devices.PRECISION_ENV}); its vectors are not written. "
                f"Run it with {devices.PRECISION_ENV}={pinned} (or unset), or list "
                f'"{encoder.precision}" in compatible_precisions of alias "{spec.alias}" once '
                "verify in such a process shows the vectors agree.")
        _check_probes_once(version, encoder)  # the version's tolerance decides, once per process
    elif version.library_versions and encoder.library_versions() != version.library_versions:
        _check_probes_once(version, encoder)
    return encoder


# (version, fingerprint, precision) whose probes passed in this process
_probed: set[tuple[int, str, str | None]] = set()


def _check_probes_once(version: EmbeddingVersion, encoder: Encoder) -> None:
    """Libraries that compute the vectors changed since ``add`` (an upgrade of torch or
    sentence-transformers), or this process computes at a precision the alias accepts for the
    version: not a refusal, a probe comparison, once per process; only a changed output
    refuses."""
    # Load-bearing lazy import: probes encodes through this module (a cycle), and imports the
    # app's models, which a worker's Celery app module importing encoders may not have loaded.
    from . import probes

    key = (version.pk, encoder.fingerprint, encoder.precision)
    if key in _probed:
        return
    report = probes.run(version, encoder)
    if not report.passed:
        raise ProbeMismatch(report.summary())
    _probed.add(key)
