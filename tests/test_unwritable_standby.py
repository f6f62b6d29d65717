"""A standby whose model can no longer be loaded stops being a rollback target instead of failing
the user's saves (issue 12, build 4): the save succeeds, the version is marked with the reason,
status, the admin and `check --deploy` report it, and `rollback` refuses it with the reason until
a backfill finds its model loading again."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from django.core import checks
from django.core.management import call_command
from django.core.management.base import CommandError

from embeddings_app import encoders
from embeddings_app.models import EmbeddingVersion, State
from project.news.models import Article
from tests.backfill_helpers import assert_every_row_fresh
from tests.conftest import TARGET
from tests.test_admin import OPERATOR_PERMS, login, make_user

pytestmark = pytest.mark.django_db(transaction=True)  # the mark is recorded after the commit


def flip_last_byte(folder: Path) -> None:
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))


def state(version: str) -> EmbeddingVersion:
    return EmbeddingVersion.objects.get(target=TARGET, version=version)


def test_a_broken_standby_model_fails_no_save_and_is_refused_as_rollback_target(
        make_articles: Callable, tmp_path: Path, settings: Any) -> None:
    make_articles(8)
    folders = {}
    models = dict(settings.EMBEDDINGS["MODELS"])
    for name in ("old", "new"):
        folders[name] = tmp_path / name
        shutil.copytree(models["tiny"]["model"], folders[name])
        models[name] = {"model": str(folders[name]), "revision": f"copy-{name}"}
    settings.EMBEDDINGS = {**settings.EMBEDDINGS, "MODELS": models}
    for version, alias in (("v1", "old"), ("v2", "new")):
        call_command("embeddings", "add", TARGET, version, "--model", alias)
        call_command("embeddings", "backfill", TARGET, version, "--inline")
        call_command("embeddings", "activate", TARGET, version, "--force")
    assert state("v1").state == State.STANDBY
    flip_last_byte(folders["old"])  # v1's model files change under it

    try:
        article = Article.objects.first()
        article.body = "Saved while the standby's model is broken."
        article.save()  # does not raise
        v1 = state("v1")
        assert "FingerprintMismatch" in v1.write_error and v1.write_error_at
        assert article.embedding.vector("v2") is not None  # the active version is written
        before = article.embedding.vector("v1")
        article.title = "Saved again"
        article.save()  # v1 is left out now
        assert np.array_equal(article.embedding.vector("v1"), before)

        out = StringIO()
        call_command("embeddings", "status", TARGET, stdout=out)
        assert "NOT WRITTEN: FingerprintMismatch" in out.getvalue()
        warnings = [m for m in checks.run_checks(include_deployment_checks=True)
                    if m.id == "embeddings.W110"]
        assert len(warnings) == 1 and "has not been written since" in warnings[0].msg
        client = login(make_user("operator", staff=True, codenames=OPERATOR_PERMS))
        page = client.get(f"/admin/embeddings_app/embeddingversion/{v1.pk}/change/")
        assert b"Not written" in page.content and b"FingerprintMismatch" in page.content

        with pytest.raises(CommandError) as refused:
            call_command("embeddings", "rollback", TARGET)
        assert str(refused.value).startswith(f"Cannot roll back to {TARGET}@v1: {TARGET}@v1 has "
                                             "not been written since")
        assert "FingerprintMismatch" in str(refused.value) and "\n" not in str(refused.value)
        assert state("v2").state == State.ACTIVE
        with pytest.raises(CommandError, match="Cannot activate"):
            call_command("embeddings", "activate", TARGET, "v1", "--force")

        flip_last_byte(folders["old"])  # restored
        encoders.clear_cache()
        call_command("embeddings", "backfill", TARGET, "v1", "--inline")
        assert state("v1").write_error == ""
        assert assert_every_row_fresh(TARGET, "v1") == 8  # fresh again, the saves included
        call_command("embeddings", "rollback", TARGET)
        assert state("v1").state == State.ACTIVE
    finally:
        encoders.clear_cache()
    assert settings.EMBEDDINGS["MODELS"]["old"]["model"] == str(folders["old"])
