"""The ``EMBEDDINGS`` setting, validated once and read as typed objects.

``validate()`` lists every problem (the system checks report them); ``get_config()`` returns the
parsed setting or raises ``ConfigurationError`` with the first problem.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from django.conf import settings

from .exceptions import ConfigurationError, Refused
from .limits import (
    MAX_BATCH_SIZE,
    MAX_TRUNCATION_SAMPLE,
    PARALLEL_MAINTENANCE_WORKERS,
    memory_kb,
)

DUAL_WRITE_MODES = ("sync", "on_commit", "celery")
LAYOUTS = ("column", "table")  # where a new version's vectors live (embeddings_app.stores)
STORAGES = ("vector", "halfvec")
# Floating-point precisions a local model computes at (docs/devices.md); float32 is the default
# and is left out of the pinned encode settings, so versions added before it keep their
# fingerprint.
PRECISIONS = ("float32", "float16", "bfloat16")
DEFAULT_PRECISION = "float32"
# Texts per forward pass by device type, unless the alias or the worker says otherwise: a GPU
# wants hundreds (a starting point: measure yours with `python -m benchmarks.backfill --device`).
DEFAULT_ENCODE_BATCH_SIZES = {"cpu": 32, "cuda": 256}
FLOATING_REVISIONS = frozenset({"main", "master", "latest", "head", "default"})
# pgvector cannot index a `vector` column above 2,000 dimensions; halfvec goes to 4,000.
MAX_INDEXED_VECTOR_DIMENSIONS = 2000

DEFAULTS: dict[str, Any] = {"BATCH_SIZE": 128, "DUAL_WRITE": "sync", "QUEUE": "embeddings",
                             # query vectors kept per model (repeated queries skip the encoder)
                             "QUERY_CACHE_SIZE": 1024,
                             # a new version's layout unless `add` is told otherwise
                             "LAYOUT": "column",
                             # change capture (docs/backfill.md): a trigger queues the rows
                             # written behind the app's back; the sweep drains the queue
                             "CHANGE_CAPTURE": True,
                             # the sweep also reads every row (the safety net; off: it drains)
                             "SWEEP_FULL_SCAN": False,
                             # rows whose tokens are counted against the model's limit by add,
                             # verify and compare (embeddings_app.truncation); all if fewer
                             "TRUNCATION_SAMPLE": 1000}
# Cutover settings (optional): seconds, or a cosine similarity for VERIFY_THRESHOLD.
CUTOVER_DEFAULTS: dict[str, Any] = {
    "ACTIVE_CACHE_TTL": 1.0,  # a serving process re-reads the active version at most this late
    "VERIFY_THRESHOLD": 0.999,  # min cosine(stored, re-embedded) for a sampled row to pass
    "VERIFY_SAMPLE": 200,  # rows re-embedded by `verify`
    "VERIFY_MAX_AGE": 86400.0,  # `activate` needs a passing verify at most this old
    "DROP_GRACE_PERIOD": 86400.0,  # `drop` needs --yes within this time after deactivation
    # A running batch's lease (its worker renews it every third of this): a batch whose lease
    # expired (its worker died) is re-dispatched by whoever follows the run (docs/backfill.md).
    "BATCH_LEASE": 60.0,
    # The shadow gate (embeddings_app.shadow): `activate` refuses a version with fewer shadow
    # queries, or a lower mean overlap@k with the served results; 0 / None: no gate.
    "SHADOW_MIN_QUERIES": 0,
    "SHADOW_MIN_OVERLAP": None,
}
# Index builds (optional; None: the server's own setting). Flags of `index` override them.
INDEX_DEFAULTS: dict[str, Any] = {
    "INDEX_MAINTENANCE_WORK_MEM": None,  # e.g. "2GB": maintenance_work_mem of the build's session
    "INDEX_PARALLEL_WORKERS": None,  # max_parallel_maintenance_workers of the build's session
}
# Searches (optional). A binary-quantized version (`embeddings derive --storage bit`) takes this
# many times k candidates from its Hamming index and re-ranks them by its parent's vectors.
SEARCH_DEFAULTS: dict[str, Any] = {"RERANK_OVERSAMPLING": 20}
MAX_RERANK_OVERSAMPLING = 1000
TOP_LEVEL_KEYS = frozenset({"MODELS", *DEFAULTS, *CUTOVER_DEFAULTS, *INDEX_DEFAULTS,
                            *SEARCH_DEFAULTS})

# key -> (accepted types, description used in messages)
MODEL_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "model": ((str,), "a hub id or a local directory"),
    "revision": ((str,), "a pinned revision (commit hash or tag)"),
    "dimensions": ((int,), "a positive integer"),
    "normalize": ((bool,), "True or False"),
    "truncate_dim": ((int,), "a positive integer"),
    "query_prompt": ((str,), "a string"),
    "document_prompt": ((str,), "a string"),
    "max_seq_length": ((int,), "a positive integer"),
    "storage": ((str,), '"vector" or "halfvec"'),
    # Chunked versions (embeddings_app.chunking): every version added with this alias embeds
    # chunks of at most "chunks" of the model's tokens, neighbours sharing at most "chunk_overlap".
    "chunks": ((int,), "a positive number of tokens"),
    "chunk_overlap": ((int,), "a number of tokens >= 0"),
    # Local models (docs/devices.md): the pinned precision, the precisions a worker may compute
    # this alias's versions at instead (probes must agree), texts per forward pass.
    "precision": ((str,), '"float32", "float16" or "bfloat16"'),
    "compatible_precisions": ((list, tuple), 'a list of precisions, e.g. ["bfloat16"]'),
    "encode_batch_size": ((int, dict), 'a positive integer, or a dict by device type, e.g. '
                          '{"cpu": 32, "cuda": 256}'),
    "provider": ((str,), '"sentence-transformers" or "openai"'),
    "verify_threshold": ((int, float), "a cosine similarity in (0, 1]"),
    # OpenAI-compatible APIs only (docs/providers.md)
    "base_url": ((str,), 'the API\'s base URL, e.g. "https://api.openai.com/v1"'),
    "api_key_env": ((str,), "the name of an environment variable holding the API key"),
    "max_batch_inputs": ((int,), "a positive integer"),
    "max_batch_tokens": ((int,), "a positive integer"),
    "max_input_tokens": ((int,), "a positive integer"),
    "tokens_per_minute": ((int,), "a positive integer"),
    "requests_per_minute": ((int,), "a positive integer"),
    "timeout": ((int, float), "a number of seconds > 0"),
    "price_per_million_tokens": ((int, float), "a price >= 0 (your currency per 1M tokens)"),
}
REQUIRED_MODEL_KEYS = ("model", "revision")
PROVIDERS = ("sentence-transformers", "openai")
# Keys that only mean something for one provider.
LOCAL_ONLY_KEYS = frozenset({"max_seq_length", "precision", "compatible_precisions",
                             "encode_batch_size", "chunks", "chunk_overlap"})
API_ONLY_KEYS = frozenset({"base_url", "api_key_env", "max_batch_inputs", "max_batch_tokens",
                           "max_input_tokens", "tokens_per_minute", "requests_per_minute",
                           "timeout", "price_per_million_tokens"})
# OpenAI's own request limits: 2,048 inputs and 300,000 tokens per /v1/embeddings request.
API_DEFAULTS: dict[str, Any] = {"max_batch_inputs": 2048, "max_batch_tokens": 300_000,
                                "timeout": 60.0}
# An environment variable name; anything else in api_key_env is taken for a literal key.
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class ModelSpec:
    """One pinned model, as named by an alias of ``EMBEDDINGS["MODELS"]``."""

    alias: str
    model: str
    revision: str
    dimensions: int | None = None
    normalize: bool = True
    truncate_dim: int | None = None
    query_prompt: str | None = None
    document_prompt: str | None = None
    max_seq_length: int | None = None
    storage: str | None = None
    provider: str = "sentence-transformers"
    verify_threshold: float | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    max_batch_inputs: int = API_DEFAULTS["max_batch_inputs"]
    max_batch_tokens: int = API_DEFAULTS["max_batch_tokens"]
    max_input_tokens: int | None = None
    tokens_per_minute: int | None = None
    requests_per_minute: int | None = None
    timeout: float = API_DEFAULTS["timeout"]
    price_per_million_tokens: float | None = None
    precision: str = DEFAULT_PRECISION
    compatible_precisions: tuple[str, ...] = ()
    encode_batch_size: int | dict[str, int] | None = None
    # Not encode settings: how a version's rows are cut, stored on the version (``add``); left
    # out of comparisons, so the loaded model is shared by specs that differ only in them.
    chunks: int | None = field(default=None, compare=False)
    chunk_overlap: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # Hashable and comparable whatever the setting's container types (the encoder cache
        # compares specs).
        object.__setattr__(self, "compatible_precisions", tuple(self.compatible_precisions))
        if isinstance(self.encode_batch_size, dict):
            object.__setattr__(self, "encode_batch_size",
                               tuple(sorted(self.encode_batch_size.items())))

    @property
    def is_api(self) -> bool:
        return self.provider != "sentence-transformers"

    def encode_batch_size_for(self, device_type: str) -> int:
        """Texts per forward pass on ``device_type`` ("cpu", "cuda")."""
        size = self.encode_batch_size
        if isinstance(size, int):
            return size
        by_device = {**DEFAULT_ENCODE_BATCH_SIZES, **dict(size or ())}
        return by_device.get(device_type, DEFAULT_ENCODE_BATCH_SIZES["cpu"])

    def encode_settings(self) -> dict[str, Any]:
        """The settings that change the vectors a model produces (part of the fingerprint).

        A local model's are exactly those of before providers existed (so existing fingerprints
        stay valid); an API's add what it sends and how inputs are cut."""
        data = asdict(self)
        keep = ["normalize", "truncate_dim", "query_prompt", "document_prompt"]
        if self.is_api:
            keep += ["provider", "base_url", "dimensions", "max_input_tokens"]
        else:
            keep.append("max_seq_length")
            if self.precision != DEFAULT_PRECISION:  # float32 pins stay as they always were
                keep.append("precision")
        return {key: data[key] for key in keep}


@dataclass(frozen=True)
class EmbeddingsConfig:
    models: dict[str, ModelSpec]
    batch_size: int
    dual_write: str
    queue: str
    query_cache_size: int = DEFAULTS["QUERY_CACHE_SIZE"]
    layout: str = DEFAULTS["LAYOUT"]
    change_capture: bool | str = DEFAULTS["CHANGE_CAPTURE"]
    sweep_full_scan: bool = DEFAULTS["SWEEP_FULL_SCAN"]
    truncation_sample: int = DEFAULTS["TRUNCATION_SAMPLE"]
    active_cache_ttl: float = CUTOVER_DEFAULTS["ACTIVE_CACHE_TTL"]
    verify_threshold: float = CUTOVER_DEFAULTS["VERIFY_THRESHOLD"]
    verify_sample: int = CUTOVER_DEFAULTS["VERIFY_SAMPLE"]
    verify_max_age: float = CUTOVER_DEFAULTS["VERIFY_MAX_AGE"]
    drop_grace_period: float = CUTOVER_DEFAULTS["DROP_GRACE_PERIOD"]
    batch_lease: float = CUTOVER_DEFAULTS["BATCH_LEASE"]
    shadow_min_queries: int = CUTOVER_DEFAULTS["SHADOW_MIN_QUERIES"]
    shadow_min_overlap: float | None = CUTOVER_DEFAULTS["SHADOW_MIN_OVERLAP"]
    index_maintenance_work_mem: str | int | None = None
    index_parallel_workers: int | None = None
    rerank_oversampling: int = SEARCH_DEFAULTS["RERANK_OVERSAMPLING"]

    @property
    def capture_mode(self) -> str | None:
        """``"trigger"``, ``"logical"``, or None when change capture is off."""
        if self.change_capture is True:
            return "trigger"
        return self.change_capture or None

    def model(self, alias: str) -> ModelSpec:
        try:
            return self.models[alias]
        except KeyError:
            known = ", ".join(sorted(self.models)) or "none"
            raise ConfigurationError(
                f'Unknown model alias "{alias}" (configured: {known}); '
                'add it to EMBEDDINGS["MODELS"].'
            ) from None


@dataclass(frozen=True)
class Problem:
    id: str
    message: str
    hint: str


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def validate(raw: Any) -> list[Problem]:
    """Every problem of an ``EMBEDDINGS`` value, in a stable order."""
    if raw is None:
        return [Problem("embeddings.E001", "The EMBEDDINGS setting is missing.",
                        'Define EMBEDDINGS = {"MODELS": {...}} in your settings.')]
    if not isinstance(raw, dict):
        return [Problem("embeddings.E002", f"EMBEDDINGS must be a dict, not {type(raw).__name__}.",
                        'Define EMBEDDINGS = {"MODELS": {...}}.')]
    problems: list[Problem] = []
    for key in sorted(set(raw) - TOP_LEVEL_KEYS):
        problems.append(Problem("embeddings.E003", f'Unknown key EMBEDDINGS["{key}"].',
                                f"Known keys: {', '.join(sorted(TOP_LEVEL_KEYS))}."))
    models = raw.get("MODELS")
    if not isinstance(models, dict) or not models:
        problems.append(Problem("embeddings.E004",
                                'EMBEDDINGS["MODELS"] must be a non-empty dict of alias -> model.',
                                'e.g. {"minilm": {"model": "sentence-transformers/all-MiniLM-L6-v2", '
                                '"revision": "<commit>"}}'))
        models = {}
    for alias, spec in models.items():
        problems.extend(_validate_model(alias, spec))
    if "BATCH_SIZE" in raw and not (_positive_int(raw["BATCH_SIZE"])
                                    and raw["BATCH_SIZE"] <= MAX_BATCH_SIZE):
        problems.append(Problem("embeddings.E010",
                                f'EMBEDDINGS["BATCH_SIZE"] must be a positive integer (at '
                                f'most {MAX_BATCH_SIZE}), not {raw["BATCH_SIZE"]!r}.', "e.g. 128"))
    if "DUAL_WRITE" in raw and raw["DUAL_WRITE"] not in DUAL_WRITE_MODES:
        problems.append(Problem("embeddings.E011",
                                f'EMBEDDINGS["DUAL_WRITE"] must be one of {", ".join(DUAL_WRITE_MODES)}, '
                                f'not {raw["DUAL_WRITE"]!r}.', 'Use "sync" unless you run workers.'))
    cache_size = raw.get("QUERY_CACHE_SIZE", 0)
    if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
        problems.append(Problem("embeddings.E013",
                                f'EMBEDDINGS["QUERY_CACHE_SIZE"] must be an integer >= 0, '
                                f"not {cache_size!r}.", "e.g. 1024; 0 turns the cache off"))
    if "QUEUE" in raw and not (isinstance(raw["QUEUE"], str) and raw["QUEUE"]):
        problems.append(Problem("embeddings.E012",
                                f'EMBEDDINGS["QUEUE"] must be a non-empty string, not {raw["QUEUE"]!r}.',
                                'e.g. "embeddings"'))
    if "LAYOUT" in raw and raw["LAYOUT"] not in LAYOUTS:
        problems.append(Problem("embeddings.E020",
                                f'EMBEDDINGS["LAYOUT"] must be one of {", ".join(LAYOUTS)}, '
                                f'not {raw["LAYOUT"]!r}.',
                                '"table" keeps each version in a table of its own (large tables, '
                                'see docs/backfill.md, "Choosing a layout"); "column" is the '
                                "default."))
    if "CHANGE_CAPTURE" in raw and not (isinstance(raw["CHANGE_CAPTURE"], bool)
                                        or raw["CHANGE_CAPTURE"] in CAPTURE_MODES):
        problems.append(Problem("embeddings.E060", 'EMBEDDINGS["CHANGE_CAPTURE"] must be True, '
                                f'False, "trigger" or "logical", not {raw["CHANGE_CAPTURE"]!r}.',
                                CAPTURE_HINTS["CHANGE_CAPTURE"]))
    if "SWEEP_FULL_SCAN" in raw and not isinstance(raw["SWEEP_FULL_SCAN"], bool):
        problems.append(Problem("embeddings.E061", 'EMBEDDINGS["SWEEP_FULL_SCAN"] must be True or '
                                f'False, not {raw["SWEEP_FULL_SCAN"]!r}.',
                                CAPTURE_HINTS["SWEEP_FULL_SCAN"]))
    sample = raw.get("TRUNCATION_SAMPLE", 1)
    if not (_positive_int(sample) and sample <= MAX_TRUNCATION_SAMPLE):
        problems.append(Problem("embeddings.E070",
                                f'EMBEDDINGS["TRUNCATION_SAMPLE"] must be a positive integer (at '
                                f"most {MAX_TRUNCATION_SAMPLE}), not {sample!r}.",
                                "e.g. 1000: rows whose tokens add, verify and compare count "
                                "against the model's limit (docs/cutover.md, \"Truncation\")."))
    problems.extend(_validate_cutover(raw))
    problems.extend(_validate_index(raw))
    return problems


def _validate_index(raw: dict[str, Any]) -> list[Problem]:
    problems = []
    memory = raw.get("INDEX_MAINTENANCE_WORK_MEM")
    if memory is not None:
        try:
            memory_kb('EMBEDDINGS["INDEX_MAINTENANCE_WORK_MEM"]', memory)
        except Refused as exc:  # the same line as the flag's
            problems.append(Problem("embeddings.E050", str(exc),
                                    'e.g. "2GB": about 1.3 x rows x (8 + 4 x dimensions) bytes '
                                    "keeps an HNSW graph in memory (docs/cutover.md, \"Large "
                                    'indexes")'))
    workers = raw.get("INDEX_PARALLEL_WORKERS")
    low, high = PARALLEL_MAINTENANCE_WORKERS
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or not low <= workers <= high):
        problems.append(Problem("embeddings.E051",
                                f'EMBEDDINGS["INDEX_PARALLEL_WORKERS"] must be an integer from '
                                f"{low} to {high}, not {workers!r}.",
                                "e.g. 4; the server's max_parallel_workers caps it"))
    oversampling = raw.get("RERANK_OVERSAMPLING", SEARCH_DEFAULTS["RERANK_OVERSAMPLING"])
    if not (_positive_int(oversampling) and oversampling <= MAX_RERANK_OVERSAMPLING):
        problems.append(Problem("embeddings.E052",
                                f'EMBEDDINGS["RERANK_OVERSAMPLING"] must be an integer from 1 to '
                                f"{MAX_RERANK_OVERSAMPLING}, not {oversampling!r}.",
                                "e.g. 20: a bit version re-ranks 20 x k candidates (docs/"
                                'cutover.md, "Binary quantization with a re-rank")'))
    return problems


# EMBEDDINGS["CHANGE_CAPTURE"]'s ways of capturing writes; True means "trigger", False none.
CAPTURE_MODES = ("trigger", "logical")

CAPTURE_HINTS = {
    "CHANGE_CAPTURE": "True or \"trigger\" (the default): `add` installs a trigger that queues the "
                      "rows written without a save signal; \"logical\": the drain reads them from "
                      "the server's write-ahead log (wal_level = logical), nothing is added to "
                      "your writes; False: the sweep reads every row (docs/backfill.md, "
                      "\"Change capture\").",
    "SWEEP_FULL_SCAN": "False (the default): the sweep drains the change queue; True: it also "
                       "reads every row, the safety net for writes made with the trigger "
                       "disabled (docs/backfill.md, \"Change capture\").",
}


def _validate_cutover(raw: dict[str, Any]) -> list[Problem]:
    problems = []
    for key in ("ACTIVE_CACHE_TTL", "VERIFY_MAX_AGE", "DROP_GRACE_PERIOD"):
        value = raw.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            problems.append(Problem("embeddings.E013",
                                    f'EMBEDDINGS["{key}"] must be a number of seconds >= 0, '
                                    f"not {value!r}.", f"e.g. {CUTOVER_DEFAULTS[key]}"))
    lease = raw.get("BATCH_LEASE", 60)
    if isinstance(lease, bool) or not isinstance(lease, (int, float)) or not 1 <= lease <= 3600:
        problems.append(Problem("embeddings.E040",
                                f'EMBEDDINGS["BATCH_LEASE"] must be a number of seconds from 1 to '
                                f"3600, not {lease!r}.", "e.g. 60"))
    threshold = raw.get("VERIFY_THRESHOLD", 0.5)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (
            -1 <= threshold <= 1):
        problems.append(Problem("embeddings.E014",
                                f'EMBEDDINGS["VERIFY_THRESHOLD"] must be a cosine similarity '
                                f"between -1 and 1, not {threshold!r}.", "e.g. 0.999"))
    if "VERIFY_SAMPLE" in raw and not _positive_int(raw["VERIFY_SAMPLE"]):
        problems.append(Problem("embeddings.E015",
                                f'EMBEDDINGS["VERIFY_SAMPLE"] must be a positive integer, '
                                f'not {raw["VERIFY_SAMPLE"]!r}.', "e.g. 200"))
    queries = raw.get("SHADOW_MIN_QUERIES", 0)
    if isinstance(queries, bool) or not isinstance(queries, int) or queries < 0:
        problems.append(Problem("embeddings.E080",
                                f'EMBEDDINGS["SHADOW_MIN_QUERIES"] must be an integer >= 0 (0: no '
                                f"gate), not {queries!r}.", "e.g. 500"))
    overlap = raw.get("SHADOW_MIN_OVERLAP")
    if overlap is not None and (isinstance(overlap, bool) or not isinstance(overlap, (int, float))
                                or not 0 <= overlap <= 1):
        problems.append(Problem("embeddings.E081",
                                f'EMBEDDINGS["SHADOW_MIN_OVERLAP"] must be a mean overlap@k '
                                f"between 0 and 1, or None (no gate), not {overlap!r}.", "e.g. 0.6"))
    return problems


def _validate_model(alias: Any, spec: Any) -> list[Problem]:
    where = f'EMBEDDINGS["MODELS"][{alias!r}]'
    if not isinstance(alias, str) or not alias:
        return [Problem("embeddings.E005", f"Model alias {alias!r} must be a non-empty string.",
                        'e.g. "minilm"')]
    if not isinstance(spec, dict):
        return [Problem("embeddings.E005", f"{where} must be a dict, not {type(spec).__name__}.",
                        '{"model": "...", "revision": "..."}')]
    problems = []
    for key in sorted(set(spec) - set(MODEL_KEYS)):
        problems.append(Problem("embeddings.E006", f'Unknown key "{key}" in {where}.',
                                f"Known keys: {', '.join(MODEL_KEYS)}."))
    for key in REQUIRED_MODEL_KEYS:
        if key not in spec:
            hint = ("Pin the model: set the commit hash of the model files you tested with."
                    if key == "revision" else "Set a hub id or a local sentence-transformers folder.")
            problems.append(Problem("embeddings.E007", f'{where} has no "{key}".', hint))
    for key, value in spec.items():
        if key not in MODEL_KEYS:
            continue
        types, description = MODEL_KEYS[key]
        is_int = types == (int,)
        ok = _positive_int(value) if is_int else isinstance(value, types)
        if key == "chunk_overlap":
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        if types == (int, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key in ("query_prompt", "document_prompt", "truncate_dim", "dimensions",
                   "max_seq_length", "max_input_tokens", "tokens_per_minute",
                   "requests_per_minute", "price_per_million_tokens",
                   "verify_threshold") and value is None:
            ok = True
        if not ok:
            problems.append(Problem("embeddings.E008",
                                    f'{where}["{key}"] must be {description}, not {value!r}.',
                                    f'Fix the value of "{key}".'))
        elif key in ("model", "revision") and not value.strip():
            problems.append(Problem("embeddings.E008", f'{where}["{key}"] is empty.',
                                    f'Set "{key}".'))
    revision = spec.get("revision")
    if isinstance(revision, str) and revision.strip().lower() in FLOATING_REVISIONS:
        problems.append(Problem("embeddings.E009",
                                f'{where}["revision"] is "{revision}", a moving branch, not a pin.',
                                "Use the commit hash of the exact model files, so a change of the "
                                "files cannot silently change the vectors."))
    problems.extend(_validate_provider(where, spec))
    problems.extend(_validate_device_keys(where, spec))
    chunks, overlap = spec.get("chunks"), spec.get("chunk_overlap")
    if overlap is not None and chunks is None:
        problems.append(Problem("embeddings.E090",
                                f'{where} sets "chunk_overlap" but not "chunks".',
                                'Set "chunks" (tokens per chunk) too, or remove "chunk_overlap".'))
    elif (_positive_int(chunks) and isinstance(overlap, int) and not isinstance(overlap, bool)
          and overlap >= chunks):
        problems.append(Problem("embeddings.E091",
                                f'{where}["chunk_overlap"] ({overlap}) must be below "chunks" '
                                f"({chunks}).", "e.g. an overlap of a tenth of the chunk size."))
    storage = spec.get("storage")
    if isinstance(storage, str) and storage not in STORAGES:
        problems.append(Problem("embeddings.E008",
                                f'{where}["storage"] must be "vector" or "halfvec", not {storage!r}.',
                                'Leave it out to choose automatically (halfvec above 2,000 dims).'))
    return problems


def _validate_device_keys(where: str, spec: dict[str, Any]) -> list[Problem]:
    """``precision``, ``compatible_precisions`` and ``encode_batch_size`` (docs/devices.md)."""
    problems = []
    precision = spec.get("precision", DEFAULT_PRECISION)
    if isinstance(precision, str) and precision not in PRECISIONS:
        problems.append(Problem("embeddings.E030",
                                f'{where}["precision"] must be one of {", ".join(PRECISIONS)}, '
                                f"not {precision!r}.",
                                'Leave it out for "float32"; "float16"/"bfloat16" halve the '
                                "memory on a GPU (docs/devices.md lists the measured cosines)."))
    compatible = spec.get("compatible_precisions", ())
    if isinstance(compatible, (list, tuple)):
        bad = [value for value in compatible if value not in PRECISIONS]
        if bad:
            problems.append(Problem("embeddings.E031",
                                    f'{where}["compatible_precisions"] may only list '
                                    f'{", ".join(PRECISIONS)}, not {bad[0]!r}.',
                                    'e.g. ["bfloat16"] to let bfloat16 GPU workers write float32 '
                                    "versions whose probes agree."))
    size = spec.get("encode_batch_size")
    if isinstance(size, dict):
        for device_type, value in size.items():
            if device_type not in DEFAULT_ENCODE_BATCH_SIZES or not _positive_int(value):
                problems.append(Problem(
                    "embeddings.E032",
                    f'{where}["encode_batch_size"][{device_type!r}] must be a positive integer '
                    f'for a device type ({", ".join(DEFAULT_ENCODE_BATCH_SIZES)}), not {value!r}.',
                    'e.g. {"cpu": 32, "cuda": 256}'))
    elif isinstance(size, int) and not _positive_int(size):
        problems.append(Problem("embeddings.E032",
                                f'{where}["encode_batch_size"] must be a positive integer, '
                                f"not {size!r}.", "e.g. 32 (texts per forward pass)"))
    return problems


def _validate_provider(where: str, spec: dict[str, Any]) -> list[Problem]:
    """Per-provider keys: which apply, what an API needs, and never a literal API key."""
    problems = []
    provider = spec.get("provider", "sentence-transformers")
    if provider not in PROVIDERS:
        return [Problem("embeddings.E016",
                        f'{where}["provider"] must be one of {", ".join(PROVIDERS)}, not {provider!r}.',
                        'Use "openai" for any OpenAI-compatible /v1/embeddings endpoint (OpenAI, '
                        "Azure OpenAI, vLLM, TEI, infinity, Ollama).")]
    wrong = sorted(set(spec) & (LOCAL_ONLY_KEYS if provider == "openai" else API_ONLY_KEYS))
    for key in wrong:
        problems.append(Problem(
            "embeddings.E017", f'{where}["{key}"] does not apply to provider "{provider}".',
            "Remove it; docs/providers.md lists the keys of each provider."))
    if provider == "openai":
        base_url = spec.get("base_url")
        if not (isinstance(base_url, str) and base_url.startswith(("http://", "https://"))):
            problems.append(Problem(
                "embeddings.E018", f'{where} needs "base_url", an http(s) URL, not {base_url!r}.',
                'e.g. "https://api.openai.com/v1" or "http://127.0.0.1:7997" for a local server.'))
        key_env = spec.get("api_key_env")
        if isinstance(key_env, str) and not ENV_NAME.fullmatch(key_env):
            # Never echo the value: it is most likely a secret.
            problems.append(Problem(
                "embeddings.E019",
                f'{where}["api_key_env"] is not an environment variable name; it looks like a '
                "literal API key, which must never be in settings.",
                'Put the key in an environment variable and name it: "api_key_env": '
                '"OPENAI_API_KEY". Rotate the key if this file was shared.'))
    threshold = spec.get("verify_threshold")
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and not (
            0 < threshold <= 1):  # as embeddings_app.limits.threshold: a finite cosine in (0, 1]
        problems.append(Problem("embeddings.E014",
                                f'{where}["verify_threshold"] must be a cosine similarity in '
                                f"(0, 1], not {threshold!r}.",
                                "e.g. 0.999 for a deterministic local model, 0.98 for a hosted API"))
    for key in ("timeout", "price_per_million_tokens"):
        value = spec.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (
                value < 0 or (key == "timeout" and value == 0)):
            problems.append(Problem("embeddings.E008",
                                    f'{where}["{key}"] must be {MODEL_KEYS[key][1]}, not {value!r}.',
                                    f'Fix the value of "{key}".'))
    return problems


def parse(raw: Any) -> EmbeddingsConfig:
    problems = validate(raw)
    if problems:
        first = problems[0]
        raise ConfigurationError(f"{first.message} {first.hint} (run `manage.py check`)")
    values = {**DEFAULTS, **raw}
    models = {
        alias: ModelSpec(alias=alias, **spec) for alias, spec in values["MODELS"].items()
    }
    return EmbeddingsConfig(
        models=models,
        batch_size=values["BATCH_SIZE"],
        dual_write=values["DUAL_WRITE"],
        queue=values["QUEUE"],
        query_cache_size=values["QUERY_CACHE_SIZE"],
        layout=values["LAYOUT"],
        change_capture=values["CHANGE_CAPTURE"],
        sweep_full_scan=values["SWEEP_FULL_SCAN"],
        truncation_sample=values["TRUNCATION_SAMPLE"],
        active_cache_ttl=float(values.get("ACTIVE_CACHE_TTL", CUTOVER_DEFAULTS["ACTIVE_CACHE_TTL"])),
        verify_threshold=float(values.get("VERIFY_THRESHOLD", CUTOVER_DEFAULTS["VERIFY_THRESHOLD"])),
        verify_sample=int(values.get("VERIFY_SAMPLE", CUTOVER_DEFAULTS["VERIFY_SAMPLE"])),
        verify_max_age=float(values.get("VERIFY_MAX_AGE", CUTOVER_DEFAULTS["VERIFY_MAX_AGE"])),
        drop_grace_period=float(values.get("DROP_GRACE_PERIOD",
                                           CUTOVER_DEFAULTS["DROP_GRACE_PERIOD"])),
        batch_lease=float(values.get("BATCH_LEASE", CUTOVER_DEFAULTS["BATCH_LEASE"])),
        shadow_min_queries=int(values.get("SHADOW_MIN_QUERIES", 0)),
        shadow_min_overlap=(None if values.get("SHADOW_MIN_OVERLAP") is None
                            else float(values["SHADOW_MIN_OVERLAP"])),
        index_maintenance_work_mem=values.get("INDEX_MAINTENANCE_WORK_MEM"),
        index_parallel_workers=values.get("INDEX_PARALLEL_WORKERS"),
        rerank_oversampling=int(values.get("RERANK_OVERSAMPLING",
                                           SEARCH_DEFAULTS["RERANK_OVERSAMPLING"])),
    )


_parsed: list[tuple[Any, EmbeddingsConfig]] = []  # (the setting object, its parse)


def get_config() -> EmbeddingsConfig:
    """The current ``settings.EMBEDDINGS``, parsed.

    Parsed again whenever the setting is replaced (``override_settings`` and friends replace the
    object); the value is treated as immutable, like every Django setting at run time. This runs
    on every search and save, so it must cost nothing in the steady state.
    """
    raw = getattr(settings, "EMBEDDINGS", None)
    cached = _parsed[0] if _parsed else None
    if cached is not None and cached[0] is raw:
        return cached[1]
    config = parse(raw)
    _parsed[:] = [(raw, config)]
    return config
