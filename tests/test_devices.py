"""Devices, precision and encode batches (docs/devices.md): per worker process, never in the
shared settings. No GPU here: the code path is the same for every device, tested on CPU."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from embeddings_app import backfill, devices, encoders, lifecycle, probes, registry, tasks
from embeddings_app.config import get_config, validate
from embeddings_app.exceptions import (
    DeviceError,
    DeviceUnavailable,
    PrecisionMismatch,
    ProbeMismatch,
    Refused,
)
from embeddings_app.models import BackfillRun, EmbeddingVersion, RowFailure
from embeddings_app.verify import verify
from project.news.models import Article
from tests.backfill_helpers import WORKER_ENV, create_articles
from tests.conftest import TARGET
from tests.workers import wait_for_run

# The fingerprints of the packaged all-MiniLM-L6-v2 aliases of project/settings.py as computed by
# main at 104bb23, before precision existed: versions added then must keep them.
FINGERPRINTS_BEFORE_PRECISION = {
    "minilm": "92bd4ec8825c82e0d7984f69f06e8b3b7cf3a98243e5d416bc21754ff7fe2742",
    "minilm256": "91987a15719ff0c9744006b7bf5f066040bc4f2216cae6bd55bc62607f7b494d",
}


@pytest.fixture(autouse=True)
def process_defaults(monkeypatch: pytest.MonkeyPatch):
    """Each test starts as a web process: none of the per-process variables set."""
    for name in (devices.DEVICE_ENV, devices.PRECISION_ENV, devices.ENCODE_BATCH_SIZE_ENV):
        monkeypatch.delenv(name, raising=False)
    yield
    encoders.clear_cache()  # no encoder of a test's device options serves the next test


def embeddings_with_alias(alias: str, **changes: object) -> dict:
    value = copy.deepcopy(settings.EMBEDDINGS)
    value["MODELS"][alias].update(changes)
    return value


def texts_of(count: int) -> list[str]:
    field = registry.get(TARGET)
    return [field.source_text(a) for a in Article.objects.order_by("pk")[:count]]


# 1. Device per process


def test_a_process_without_device_options_encodes_on_cpu_at_float32():
    encoder = encoders.load(get_config().model("tiny"))
    assert (encoder.device, encoder.precision, encoder.encode_batch_size) == ("cpu", "float32", 32)
    assert {p.device.type for p in encoder.model.parameters()} == {"cpu"}
    assert {p.dtype for p in encoder.model.parameters()} == {torch.float32}


def test_auto_falls_back_to_cpu_without_a_gpu(monkeypatch: pytest.MonkeyPatch):
    assert torch.cuda.device_count() == 0  # this machine: a CPU build of torch, no GPU
    monkeypatch.setenv(devices.DEVICE_ENV, "auto")
    encoder = encoders.load(get_config().model("tiny"))
    assert encoder.device == "cpu"
    assert {p.device.type for p in encoder.model.parameters()} == {"cpu"}


@pytest.mark.parametrize(("value", "message"), [
    ("tpu", "EMBEDDINGS_DEVICE='tpu' is not a device this app knows"),
    ("cuda", "EMBEDDINGS_DEVICE=cuda but torch sees no CUDA device"),
    ("cuda:1", "EMBEDDINGS_DEVICE=cuda:1 but torch sees no CUDA device"),
])
def test_an_unknown_or_absent_device_is_one_clear_error_at_model_load_and_in_check(
        monkeypatch: pytest.MonkeyPatch, value: str, message: str):
    monkeypatch.setenv(devices.DEVICE_ENV, value)
    with pytest.raises(DeviceError, match=re.escape(message)):
        encoders.load(get_config().model("tiny"))
    with pytest.raises(SystemCheckError) as excinfo:
        call_command("check")
    assert "embeddings.E033" in str(excinfo.value) and message in str(excinfo.value)


@pytest.mark.parametrize(("name", "value", "message"), [
    (devices.PRECISION_ENV, "float8", "EMBEDDINGS_PRECISION='float8' is not a precision"),
    (devices.ENCODE_BATCH_SIZE_ENV, "0", "EMBEDDINGS_ENCODE_BATCH_SIZE='0' must be a positive"),
])
def test_a_bad_precision_or_encode_batch_size_of_the_process_is_refused_at_load(
        monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str):
    monkeypatch.setenv(name, value)
    with pytest.raises(DeviceError, match=re.escape(message)):
        encoders.load(get_config().model("tiny"))


@pytest.mark.worker
def test_a_worker_started_with_an_unknown_device_stops_at_start_with_one_clear_line(
        celery_worker):
    with pytest.raises(RuntimeError, match="exited early") as excinfo:
        celery_worker(concurrency=1, extra_env={devices.DEVICE_ENV: "tpu"})
    assert "EMBEDDINGS_DEVICE='tpu' is not a device this app knows" in str(excinfo.value)


@pytest.mark.worker
def test_a_worker_started_with_auto_takes_cpu_and_encodes_in_passes_of_its_encode_batch_size(
        celery_worker):
    """The worker's own options (auto, 3 texts per pass) are taken by the worker; this process,
    a web process, keeps cpu and the alias's encode batch size."""
    create_articles(10)
    version = lifecycle.add(TARGET, "v2", "tiny")
    worker = celery_worker(concurrency=1, app="tests.device_worker_app", extra_env={
        **WORKER_ENV, devices.DEVICE_ENV: "auto", devices.ENCODE_BATCH_SIZE_ENV: "3"})
    call_command("embeddings", "backfill", TARGET, "v2", "--batch-size", "5", "--no-wait")
    run = wait_for_run(BackfillRun.objects.get(version=version).pk)
    assert run.status == BackfillRun.Status.DONE and run.rows_embedded == 10
    assert "loaded tiny on cpu at torch.float32" in worker.log()
    passes = [int(n) for n in re.findall(r"forward pass of (\d+) texts", worker.log())]
    # Each database batch of 5 rows in passes of at most 3 texts.
    assert passes == [3, 2, 3, 2]
    here = encoders.for_version(version)
    assert (here.device, here.encode_batch_size) == ("cpu", 32)


# 2. Encode batch size apart from the database batch


def test_the_encode_batch_size_by_device_type_sets_the_forward_passes_longest_texts_first(
        make_articles, settings):
    """One database batch of 10 rows in passes of the alias's cpu encode batch size (4);
    sentence-transformers sorts the texts of the call by length first (not this app)."""
    make_articles(10)
    settings.EMBEDDINGS = embeddings_with_alias("tiny", encode_batch_size={"cpu": 4, "cuda": 512})
    encoder = encoders.load(get_config().model("tiny"))
    assert encoder.encode_batch_size == 4
    passes: list[list[int]] = []
    handle = encoder.model.register_forward_hook(
        lambda module, inputs, output: passes.append(
            output["attention_mask"].sum(dim=1).tolist()))
    try:
        vectors = encoder.encode_documents(texts_of(10))
    finally:
        handle.remove()
    assert vectors.shape == (10, encoder.dimensions)
    assert [len(tokens) for tokens in passes] == [4, 4, 2]
    lengths = [n for tokens in passes for n in tokens]
    assert lengths == sorted(lengths, reverse=True)  # longest first: little padding per pass


@pytest.mark.parametrize(("value", "check_id"), [
    ({"precision": "float64"}, "embeddings.E030"),
    ({"compatible_precisions": ["float32", "int8"]}, "embeddings.E031"),
    ({"encode_batch_size": 0}, "embeddings.E032"),
    ({"encode_batch_size": {"tpu": 8}}, "embeddings.E032"),
    ({"encode_batch_size": {"cuda": -1}}, "embeddings.E032"),
    ({"encode_batch_size": "big"}, "embeddings.E008"),
    ({"provider": "openai", "base_url": "http://x", "precision": "float16"}, "embeddings.E017"),
])
def test_device_keys_of_an_alias_are_validated_by_check_with_ids(value: dict, check_id: str):
    raw = embeddings_with_alias("tiny", **value)
    assert check_id in {problem.id for problem in validate(raw)}


# 3. Precision is part of the pin


def test_float32_keeps_the_fingerprints_of_versions_added_before_precision_existed():
    for alias, pinned in FINGERPRINTS_BEFORE_PRECISION.items():
        spec = get_config().model(alias)
        folder = encoders.resolve_model_path(spec)
        assert spec.precision == "float32" and "precision" not in spec.encode_settings()
        assert encoders.fingerprint(folder, spec) == pinned
    import dataclasses

    spec = get_config().model("minilm")
    half = dataclasses.replace(spec, precision="bfloat16")
    assert half.encode_settings()["precision"] == "bfloat16"
    assert encoders.fingerprint(encoders.resolve_model_path(spec), half) != (
        FINGERPRINTS_BEFORE_PRECISION["minilm"])


def test_add_refuses_in_a_process_computing_at_another_precision_than_the_alias_pins(
        make_articles, monkeypatch: pytest.MonkeyPatch):
    make_articles(2)
    monkeypatch.setenv(devices.PRECISION_ENV, "bfloat16")
    with pytest.raises(Refused, match="pins precision float32 but this process computes at "
                       "bfloat16"):
        lifecycle.add(TARGET, "v2", "tiny")
    assert not EmbeddingVersion.objects.filter(target=TARGET, version="v2").exists()


@pytest.mark.worker
def test_a_worker_computing_at_bfloat16_refuses_to_write_a_float32_version(celery_worker):
    create_articles(6)
    version = lifecycle.add(TARGET, "v2", "tiny")
    celery_worker(concurrency=1, extra_env={**WORKER_ENV, devices.PRECISION_ENV: "bfloat16"})
    call_command("embeddings", "backfill", TARGET, "v2", "--batch-size", "3", "--no-wait")
    run = wait_for_run(BackfillRun.objects.get(version=version).pk)
    assert run.status == BackfillRun.Status.FAILED
    errors = list(run.batches.values_list("error", flat=True))
    assert len(errors) == 2 and all(
        "PrecisionMismatch" in error and "pinned at float32 but this process computes at "
        "bfloat16" in error for error in errors), errors
    assert version.store.coverage() == (0, 6)  # nothing written


def test_a_float32_version_is_written_at_bfloat16_only_where_the_alias_accepts_it_and_probes_agree(
        make_articles, settings, monkeypatch: pytest.MonkeyPatch):
    """The real MiniLM: added at float32 here; a bfloat16 process refuses it until the alias
    lists bfloat16, then writes it once the probes agree within the version's tolerance; a
    tolerance the bfloat16 vectors miss refuses again."""
    make_articles(12)
    version = lifecycle.add(TARGET, "v2", "minilm")
    monkeypatch.setenv(devices.PRECISION_ENV, "bfloat16")
    with pytest.raises(PrecisionMismatch, match="pinned at float32 but this process computes"):
        encoders.for_version(version)

    settings.EMBEDDINGS = embeddings_with_alias("minilm", compatible_precisions=["bfloat16"])
    encoder = encoders.for_version(version)  # the probes agree: min cosine >= 0.999
    assert {p.dtype for p in encoder.model.parameters()} == {torch.bfloat16}
    assert encoder.fingerprint == version.fingerprint  # the pin is float32's
    version.refresh_from_db()
    assert version.probe_passed is True
    run, ranges = backfill.start(version, batch_size=6, mode="inline")
    backfill.run_inline(run, ranges)
    report = verify(version)  # in this bfloat16 process, against the stored vectors
    assert report.passed and report.min_cosine >= 0.999, report.problems
    monkeypatch.delenv(devices.PRECISION_ENV)
    float32 = verify(version)  # the vectors agree with float32's as well
    assert float32.passed and float32.min_cosine >= 0.999, float32.problems

    monkeypatch.setenv(devices.PRECISION_ENV, "bfloat16")
    settings.EMBEDDINGS = embeddings_with_alias("minilm", compatible_precisions=["bfloat16"],
                                                verify_threshold=0.9999999)
    encoders._probed.clear()
    with pytest.raises(ProbeMismatch, match=re.escape("probes below cosine 0.9999999")):
        encoders.for_version(version)
    assert probes.stored_vectors(version) is not None


# 4. Device failures are transient


def _limit_passes(encoder: encoders.SentenceTransformersEncoder, largest: int,
                  passes: list[int]):
    """A forward hook raising torch's own out-of-memory error on passes of more than
    ``largest`` texts, as CUDA's caching allocator does on a device too small for them."""

    def hook(module, inputs, output):
        passes.append(output["sentence_embedding"].shape[0])
        if passes[-1] > largest:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    return encoder.model.register_forward_hook(hook)


@pytest.fixture
def ten_rows_16_per_pass(make_articles, monkeypatch: pytest.MonkeyPatch):
    """A tiny version of 10 articles and its encoder, in a process of 16 texts per pass."""
    make_articles(10)
    version = lifecycle.add(TARGET, "v2", "tiny")
    monkeypatch.setenv(devices.ENCODE_BATCH_SIZE_ENV, "16")
    return version, encoders.for_version(version)


def test_out_of_memory_halves_the_forward_pass_and_writes_every_row_at_the_pinned_precision(
        ten_rows_16_per_pass):
    version, encoder = ten_rows_16_per_pass
    expected = encoder.encode_documents(texts_of(10))
    passes: list[int] = []
    handle = _limit_passes(encoder, 4, passes)
    try:
        run, ranges = backfill.start(version, batch_size=10, mode="inline")
        backfill.run_inline(run, ranges)
    finally:
        handle.remove()
    run.refresh_from_db()
    assert run.status == BackfillRun.Status.DONE and run.rows_embedded == 10
    assert passes == [10, 8, 4, 4, 2]  # 16 -> 8 -> 4 texts per pass, the same texts again
    assert not RowFailure.objects.exists()
    assert encoder.encode_batch_size == 16  # the next batch starts at the configured size
    stored = np.vstack([a.embedding.vector(version="v2") for a in Article.objects.order_by("pk")])
    assert np.allclose(stored, expected, atol=1e-6)  # float32, as pinned: never another precision


def _first_batch_fails_for_a_retry(version, encoder, hook, match: str) -> None:
    """Run batch 0 of a new inline run with ``hook`` on the model: it raises DeviceUnavailable
    (``match``), which Celery retries; no row is failed or written."""
    handle = encoder.model.register_forward_hook(hook)
    try:
        run, _ = backfill.start(version, batch_size=10, mode="inline")
        with pytest.raises(DeviceUnavailable, match=match) as exc:
            backfill.run_batch(run.pk, 0)
    finally:
        handle.remove()
    assert isinstance(exc.value, tasks.RETRYABLE)  # Celery retries the batch later
    assert not RowFailure.objects.exists()
    assert version.store.coverage() == (0, 10)


def test_out_of_memory_on_one_text_fails_the_batch_for_a_retry_without_failing_a_row(
        ten_rows_16_per_pass):
    version, encoder = ten_rows_16_per_pass
    passes: list[int] = []

    def out_of_memory(module, inputs, output):
        passes.append(output["sentence_embedding"].shape[0])
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    _first_batch_fails_for_a_retry(version, encoder, out_of_memory,
                                   "ran out of memory encoding one text")
    assert passes == [10, 8, 4, 2, 1]


def test_a_lost_device_is_transient_and_the_model_is_loaded_again(ten_rows_16_per_pass):
    version, encoder = ten_rows_16_per_pass

    def lost(module, inputs, output):
        raise torch.AcceleratorError("CUDA error: unspecified launch failure")

    _first_batch_fails_for_a_retry(version, encoder, lost, "unspecified launch failure")
    assert encoders.for_version(version) is not encoder  # a fresh model for the retry
