"""Pinned models: fingerprints and the query-vector cache."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from django.conf import settings

from embeddings_app import encoders
from embeddings_app.config import get_config


def test_fingerprint_covers_files_and_encode_settings(tmp_path: Path):
    spec = get_config().model("tiny")
    folder = encoders.resolve_model_path(spec)
    pinned = encoders.fingerprint(folder, spec)
    assert pinned == encoders.fingerprint(folder, spec)  # deterministic
    assert pinned != encoders.fingerprint(folder, dataclasses.replace(spec, normalize=False))
    assert pinned != encoders.fingerprint(folder, dataclasses.replace(spec, query_prompt="q: "))
    (folder / "extra.json").write_text("{}")
    try:
        assert pinned != encoders.fingerprint(folder, spec)
    finally:
        (folder / "extra.json").unlink()
    assert pinned == encoders.fingerprint(folder, spec)


def test_repeated_queries_are_served_from_the_cache():
    encoder = encoders.load(get_config().model("tiny"))
    first = encoder.encode_query("a query about football")
    calls = encoder.calls
    again = encoder.encode_query("a query about football")
    assert encoder.calls == calls
    assert np.array_equal(first, again)
    again[0] = 42.0  # callers get copies: the cache cannot be corrupted through a result
    assert not np.array_equal(again, encoder.encode_query("a query about football"))
    encoder.encode_query("another query")
    assert encoder.calls == calls + 1


def test_query_cache_can_be_turned_off():
    value = copy.deepcopy(settings.EMBEDDINGS)
    value["QUERY_CACHE_SIZE"] = 0
    encoder = encoders.load(get_config().model("tiny"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(settings, "EMBEDDINGS", value)
        calls = encoder.calls
        encoder.encode_query("uncached query")
        encoder.encode_query("uncached query")
        assert encoder.calls == calls + 2
