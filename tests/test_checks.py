"""`manage.py check` reports every malformed EMBEDDINGS setting with a message and a hint."""

from __future__ import annotations

import copy

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from embeddings_app.config import ConfigurationError, get_config

GOOD_MODEL = {"model": "sentence-transformers/all-MiniLM-L6-v2", "revision": "c9745ed1d9f2"}


def embeddings_with(**changes: object) -> dict:
    value = copy.deepcopy(settings.EMBEDDINGS)
    value.update(changes)
    return value


def run_check() -> str:
    with pytest.raises(SystemCheckError) as excinfo:
        call_command("check")
    return str(excinfo.value)


def test_the_project_setting_passes_the_check():
    call_command("check")  # raises SystemCheckError on any error


@pytest.mark.parametrize(
    ("models", "expected_message", "expected_hint"),
    [
        ({"m": {"model": "x/y"}}, "has no \"revision\"", "Pin the model"),
        ({"m": {**GOOD_MODEL, "revision": "main"}}, '"main", a moving branch', "Use the commit hash"),
        ({"m": {**GOOD_MODEL, "revision": "latest"}}, '"latest", a moving branch',
         "Use the commit hash"),
        ({"m": {"revision": "abc"}}, 'has no "model"', "Set a hub id"),
        ({"m": {**GOOD_MODEL, "pooling": "mean"}}, 'Unknown key "pooling"', "Known keys: model"),
        ({"m": {**GOOD_MODEL, "dimensions": "384"}}, "must be a positive integer, not '384'",
         'Fix the value of "dimensions"'),
        ({"m": {**GOOD_MODEL, "dimensions": -1}}, "must be a positive integer, not -1", "Fix"),
        ({"m": {**GOOD_MODEL, "normalize": "yes"}}, "must be True or False, not 'yes'", "Fix"),
        ({"m": {**GOOD_MODEL, "revision": 123}}, "must be a pinned revision", "Fix"),
        ({"m": {**GOOD_MODEL, "storage": "float"}}, 'must be "vector" or "halfvec"', "Leave it out"),
        ({"m": "sentence-transformers/all-MiniLM-L6-v2"}, "must be a dict, not str", '{"model"'),
        ({}, 'EMBEDDINGS["MODELS"] must be a non-empty dict', "e.g."),
    ],
)
def test_malformed_model_entries_are_reported(models, expected_message, expected_hint):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(settings, "EMBEDDINGS", embeddings_with(MODELS=models))
        output = run_check()
        with pytest.raises(ConfigurationError, match=r"run `manage\.py check`"):
            get_config()
    assert expected_message in output
    assert f"HINT: {expected_hint}" in output


@pytest.mark.parametrize(
    ("changes", "expected_message"),
    [
        ({"BATCHSIZE": 10}, 'Unknown key EMBEDDINGS["BATCHSIZE"]'),
        ({"BATCH_SIZE": "128"}, 'EMBEDDINGS["BATCH_SIZE"] must be a positive integer'),
        ({"BATCH_SIZE": 0}, 'EMBEDDINGS["BATCH_SIZE"] must be a positive integer'),
        ({"DUAL_WRITE": "async"}, 'EMBEDDINGS["DUAL_WRITE"] must be one of sync, on_commit, celery'),
        ({"QUEUE": ""}, 'EMBEDDINGS["QUEUE"] must be a non-empty string'),
    ],
)
def test_malformed_top_level_keys_are_reported(changes, expected_message):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(settings, "EMBEDDINGS", embeddings_with(**changes))
        output = run_check()
    assert expected_message in output
    assert "HINT:" in output


def test_a_missing_setting_is_reported():
    with pytest.MonkeyPatch.context() as patch:
        patch.delattr(settings, "EMBEDDINGS")
        output = run_check()
    assert "The EMBEDDINGS setting is missing." in output
