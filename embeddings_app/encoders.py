"""Pinned models: offline loading (once per process), fingerprints and encoding.

A fingerprint is a SHA-256 over every file of the model folder (weights, tokenizer, configs) and
the encode settings. It is stored when a version is added and compared on every use, so vectors
are never written or searched with model files other than those the version was built with.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .config import ModelSpec
from .exceptions import FingerprintMismatch, ModelLoadError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from .models import EmbeddingVersion

# Files that do not change what the model computes.
_IGNORED_SUFFIXES = (".md", ".gitattributes", ".lock", ".incomplete")
_ENCODE_BATCH_SIZE = 32
_DIMENSION_PROBE = "dimension probe"


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
    from huggingface_hub import snapshot_download

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
    """A loaded, fingerprinted model with the encode settings of its alias."""

    def __init__(self, spec: ModelSpec, folder: Path, model: SentenceTransformer, fingerprint: str,
                 stats: tuple[FileStat, ...]) -> None:
        self.spec = spec
        self.folder = folder
        self.model = model
        self.fingerprint = fingerprint
        self.stats = stats
        self.calls = 0  # encode calls, for tests and benchmarks
        self._lock = threading.Lock()  # torch modules are not safe to run from many threads
        # Query text -> vector. Per encoder, so per fingerprint: a cached vector can only ever
        # be reused with the exact model files and settings that produced it.
        self._query_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        probe = self._encode([_DIMENSION_PROBE], None)
        self.dimensions = int(probe.shape[1])

    def _encode(self, texts: list[str], prompt: str | None) -> np.ndarray:
        with self._lock:
            self.calls += 1
            vectors = self.model.encode(
                texts,
                prompt=prompt,
                batch_size=_ENCODE_BATCH_SIZE,
                normalize_embeddings=self.spec.normalize,
                truncate_dim=self.spec.truncate_dim,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.asarray(vectors, dtype=np.float32)

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.empty((0, self.dimensions), dtype=np.float32)
        return self._encode(texts, self.spec.document_prompt)

    def clear_query_cache(self) -> None:
        with self._lock:
            self._query_cache.clear()

    def encode_query(self, text: str) -> np.ndarray:
        from .config import get_config

        size = get_config().query_cache_size
        with self._lock:
            cached = self._query_cache.get(text)
            if cached is not None:
                self._query_cache.move_to_end(text)
                return cached.copy()
        vector = self._encode([text], self.spec.query_prompt)[0]
        if size:
            with self._lock:
                self._query_cache[text] = vector.copy()
                while len(self._query_cache) > size:
                    self._query_cache.popitem(last=False)
        return vector


_cache: dict[str, Encoder] = {}
_cache_lock = threading.Lock()


def load(spec: ModelSpec) -> Encoder:
    """The encoder of ``spec``, loaded once per process and reloaded if its files change."""
    folder = resolve_model_path(spec)
    stats = _stats(folder)
    with _cache_lock:
        cached = _cache.get(spec.alias)
        if (cached is not None and cached.spec == spec and cached.folder == folder
                and cached.stats == stats):
            return cached
        encoder = _load_uncached(spec, folder, stats)
        _cache[spec.alias] = encoder
        return encoder


def _load_uncached(spec: ModelSpec, folder: Path, stats: tuple[FileStat, ...]) -> Encoder:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # no "Loading weights" bar in command output

    try:
        model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f'Could not load model "{spec.model}" from {folder}: {type(exc).__name__}: {exc}'
        ) from exc
    if spec.max_seq_length is not None:
        model.max_seq_length = spec.max_seq_length
    return Encoder(spec, folder, model, fingerprint(folder, spec), stats)


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


def for_version(version: EmbeddingVersion) -> Encoder:
    """The encoder of ``version``'s pinned model; refuses model files other than the pinned ones."""
    from .config import get_config

    spec = get_config().model(version.model_alias)
    # Only the content matters: the same files moved to another folder are the same model.
    encoder = load(spec)
    if encoder.fingerprint != version.fingerprint:
        raise FingerprintMismatch(
            f"{version}: the files or settings of model {version.model_label} changed since the "
            f"version was added (fingerprint {encoder.fingerprint[:12]} != pinned "
            f"{version.fingerprint[:12]}); restore them, or add a new version for the new files."
        )
    return encoder
