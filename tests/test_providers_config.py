"""Provider settings: every key of an API alias is validated by `manage.py check` (ids and hints),
a literal API key is an error that never echoes the key, and a local model keeps its fingerprint."""

from __future__ import annotations

import copy

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from embeddings_app import encoders
from embeddings_app.api import OpenAIEncoder, TokenCounter, api_fingerprint, plan_requests
from embeddings_app.config import get_config, parse

API = {"provider": "openai", "model": "text-embedding-3-small", "revision": "2024-01-25",
       "base_url": "https://api.example.test/v1", "api_key_env": "EXAMPLE_API_KEY"}


def check_output(models: dict) -> str:
    value = copy.deepcopy(settings.EMBEDDINGS)
    value["MODELS"] = models
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(settings, "EMBEDDINGS", value)
        with pytest.raises(SystemCheckError) as failure:
            call_command("check")
    return str(failure.value)


def test_a_complete_api_alias_passes_the_check():
    value = copy.deepcopy(settings.EMBEDDINGS)
    value["MODELS"]["api"] = {**API, "dimensions": 512, "max_batch_inputs": 256,
                              "max_batch_tokens": 100_000, "max_input_tokens": 8191,
                              "tokens_per_minute": 1_000_000, "requests_per_minute": 3000,
                              "timeout": 30, "verify_threshold": 0.98,
                              "price_per_million_tokens": 0.02}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(settings, "EMBEDDINGS", value)
        call_command("check")
        spec = get_config().model("api")
    assert spec.is_api and spec.dimensions == 512 and spec.verify_threshold == 0.98


@pytest.mark.parametrize(("entry", "check_id", "message", "hint"), [
    ({**API, "provider": "cohere"}, "embeddings.E016", 'must be one of sentence-transformers, openai',
     "Use \"openai\" for any OpenAI-compatible"),
    ({**API, "revision": "latest"}, "embeddings.E009", '"latest", a moving branch',
     "Use the commit hash"),
    ({k: v for k, v in API.items() if k != "revision"}, "embeddings.E007", 'has no "revision"',
     "Pin the model"),
    ({**API, "base_url": "api.openai.com"}, "embeddings.E018", 'needs "base_url"', "e.g."),
    ({**API, "max_seq_length": 128}, "embeddings.E017", 'does not apply to provider "openai"',
     "Remove it; docs/providers.md"),
    ({"model": "x/y", "revision": "abc", "tokens_per_minute": 10}, "embeddings.E017",
     'does not apply to provider "sentence-transformers"', "Remove it"),
    ({**API, "tokens_per_minute": 0}, "embeddings.E008", "must be a positive integer, not 0", "Fix"),
    ({**API, "timeout": 0}, "embeddings.E008", "must be a number of seconds > 0", "Fix"),
    ({**API, "price_per_million_tokens": "cheap"}, "embeddings.E008", "must be a price", "Fix"),
    ({**API, "verify_threshold": 2}, "embeddings.E014", "must be a cosine similarity", "e.g. 0.999"),
    ({**API, "verify_threshold": 0}, "embeddings.E014", "in (0, 1], not 0", "e.g. 0.999"),
    ({**API, "verify_threshold": float("nan")}, "embeddings.E014", "in (0, 1], not nan", "e.g."),
    ({**API, "max_batch_inputs": 2.5}, "embeddings.E008", "must be a positive integer", "Fix"),
])
def test_malformed_provider_settings_are_reported_with_ids_and_hints(entry, check_id, message, hint):
    output = check_output({"m": entry})
    assert check_id in output
    assert message in output
    assert f"HINT: {hint}" in output


def test_a_literal_api_key_in_settings_is_an_error_that_never_shows_the_key():
    key = "sk-proj-Abc123def456ghi789jkl012mno345pqr678"
    output = check_output({"m": {**API, "api_key_env": key}})
    assert "embeddings.E019" in output
    assert "looks like a literal API key" in output
    assert key not in output


def test_the_api_fingerprint_pins_the_identity_not_the_limits():
    spec = parse({"MODELS": {"a": API}}).model("a")
    changed = {
        "base_url": "https://other.test/v1", "model": "text-embedding-3-large",
        "revision": "2024-02-01", "dimensions": 256, "query_prompt": "q: ",
    }
    for key, value in changed.items():
        other = parse({"MODELS": {"a": {**API, key: value}}}).model("a")
        assert api_fingerprint(other) != api_fingerprint(spec), key
    limits = parse({"MODELS": {"a": {**API, "tokens_per_minute": 5, "timeout": 3,
                                      "price_per_million_tokens": 1.0}}}).model("a")
    assert api_fingerprint(limits) == api_fingerprint(spec)


def test_local_models_keep_the_fingerprint_of_before_providers():
    """The encode settings hashed for a local model are exactly the five keys of before, so the
    versions added before providers existed are not refused."""
    spec = get_config().model("tiny")
    assert set(spec.encode_settings()) == {"normalize", "truncate_dim", "query_prompt",
                                           "document_prompt", "max_seq_length"}
    assert isinstance(encoders.load(spec), encoders.SentenceTransformersEncoder)


def test_requests_are_sized_by_inputs_and_tokens():
    assert list(plan_requests([5, 5, 5, 5, 5], max_inputs=2, max_tokens=100)) == [
        (0, 2), (2, 4), (4, 5)]
    assert list(plan_requests([40, 40, 40, 200, 10], max_inputs=10, max_tokens=100)) == [
        (0, 2), (2, 3), (3, 4), (4, 5)]  # an input above the cap goes alone
    assert list(plan_requests([], max_inputs=2, max_tokens=10)) == []


def test_tokens_are_counted_exactly_with_a_local_tokenizer_else_bounded_by_bytes():
    minilm = settings.EMBEDDINGS["MODELS"]["minilm"]["model"]
    exact = TokenCounter(parse({"MODELS": {"a": {**API, "model": minilm}}}).model("a"))
    bound = TokenCounter(parse({"MODELS": {"a": API}}).model("a"))
    texts = ["Hello world", "Grüße aus Köln", "敏捷的棕色狐狸"]
    assert exact.exact and not bound.exact
    from transformers import AutoTokenizer  # the model's own tokenizer, as the server runs it

    reference = AutoTokenizer.from_pretrained(minilm, local_files_only=True)
    assert exact.count(texts) == [len(ids) for ids in reference(texts)["input_ids"]]
    assert bound.count(texts) == [len(t.encode()) + 2 for t in texts]
    assert all(b >= e for b, e in zip(bound.count(texts), exact.count(texts), strict=True))


def test_inputs_are_cut_to_max_input_tokens():
    minilm = settings.EMBEDDINGS["MODELS"]["minilm"]["model"]
    exact = TokenCounter(parse({"MODELS": {"a": {**API, "model": minilm,
                                                 "max_input_tokens": 6}}}).model("a"))
    cut = exact.truncate(["one two three four five six seven eight"])[0]
    assert cut == "one two three four"
    assert exact.count([cut]) == [6]
    bound = TokenCounter(parse({"MODELS": {"a": {**API, "max_input_tokens": 10}}}).model("a"))
    assert bound.truncate(["abcdefghijklmnop", "short"]) == ["abcdefgh", "short"]


def test_a_missing_key_variable_is_a_clear_error(monkeypatch):
    from embeddings_app.exceptions import ProviderError

    monkeypatch.delenv("EXAMPLE_API_KEY", raising=False)
    encoder = OpenAIEncoder(parse({"MODELS": {"a": API}}).model("a"))
    with pytest.raises(ProviderError, match="EXAMPLE_API_KEY named by \"api_key_env\""):
        encoder.client  # noqa: B018
