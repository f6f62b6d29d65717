"""Refused steps exit non-zero with one clear line and change nothing in the database."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from embeddings_app import encoders, lifecycle
from embeddings_app.exceptions import FingerprintMismatch, VersionMismatch
from embeddings_app.models import BackfillRun, EmbeddingVersion, State, VersionEvent
from project.news.models import Article
from tests.conftest import TARGET
from tests.store_helpers import forget
from tests.workers import ROOT, database_url

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("layout")]  # both layouts


def stored_vectors() -> dict[str, list]:
    """Every stored vector and hash of every version that has storage, wherever it lives."""
    return {
        version.version: sorted((str(pk), source_hash, None if vector is None else vector.tobytes())
                                for pk, (vector, source_hash) in version.store.read_all().items())
        for version in EmbeddingVersion.objects.exclude(state=State.DROPPED)
    }


def database_state() -> tuple:
    """Everything a refused command must leave untouched: version records, their history and
    runs, the table's columns, the tables, and every value of every row (vectors included,
    in a column or in a table of their own)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'news_article' "
            "ORDER BY column_name"
        )
        columns = [row[0] for row in cursor.fetchall()]
        cursor.execute("SELECT md5(coalesce(string_agg(a::text, '|' ORDER BY a.id), '')) "
                       "FROM news_article a")
        rows_digest = cursor.fetchone()[0]
    versions = list(EmbeddingVersion.objects.order_by("pk").values())
    return (versions, VersionEvent.objects.count(), BackfillRun.objects.count(), columns,
            rows_digest, sorted(connection.introspection.table_names()), stored_vectors())


def assert_refused(args: list[str], expected: str) -> None:
    before = database_state()
    with pytest.raises(CommandError) as excinfo:
        call_command("embeddings", *args)
    message = str(excinfo.value)
    assert expected in message
    assert "\n" not in message, "a refusal is one line"
    assert database_state() == before


@pytest.fixture
def with_v1(make_articles: Callable) -> None:
    """12 articles; v1 (tiny) backfilled and active; v2 (tiny_other) added, not backfilled."""
    make_articles(12)
    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny")
    call_command("embeddings", "backfill", TARGET, "v1", "--inline")
    call_command("embeddings", "verify", TARGET, "v1")
    # No index: CREATE INDEX CONCURRENTLY cannot run in this test's transaction (gates: test_cutover).
    call_command("embeddings", "activate", TARGET, "v1", "--force")
    call_command("embeddings", "add", TARGET, "v2", "--model", "tiny_other")


def test_activate_an_incomplete_version(with_v1):
    assert_refused(["activate", TARGET, "v2"], "only a ready (or standby) version can be activated")
    assert EmbeddingVersion.objects.get(target=TARGET, state=State.ACTIVE).version == "v1"


def test_activate_a_version_with_rows_missing(with_v1):
    call_command("embeddings", "backfill", TARGET, "v2", "--inline")
    Article.objects.create(title="A new row", body="Written behind the app's back.")
    # As if the row's dual-write had never happened.
    forget(EmbeddingVersion.objects.get_version(TARGET, "v2"),
           list(Article.objects.filter(title="A new row").values_list("pk", flat=True)))
    assert_refused(["activate", TARGET, "v2"], "1 of 13 rows have no vector")


@pytest.mark.parametrize("step", [["retire", TARGET, "v1"], ["drop", TARGET, "v1", "--yes"]])
def test_destructive_steps_on_the_active_version(with_v1, step):
    assert_refused(step, "is active and cannot be")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("V3", 'Invalid version name "V3"'),
        ("3v", 'Invalid version name "3v"'),
        ("v-3", 'Invalid version name "v-3"'),
        ("v" * 32, "Invalid version name"),
        ("v1", 'already has a version "v1"'),
    ],
)
def test_add_with_an_invalid_or_used_version_name(with_v1, name, expected):
    assert_refused(["add", TARGET, name, "--model", "tiny"], expected)


def test_add_with_an_unknown_alias(with_v1):
    assert_refused(["add", TARGET, "v3", "--model", "nope"], 'Unknown model alias "nope"')


def test_add_with_an_unknown_target(with_v1):
    assert_refused(["add", "news.Article.nope", "v3", "--model", "tiny"],
                   'Unknown target "news.Article.nope"')


def override_models(patch: pytest.MonkeyPatch, **models: dict) -> None:
    value = copy.deepcopy(settings.EMBEDDINGS)
    value["MODELS"].update(models)
    patch.setattr(settings, "EMBEDDINGS", value)


def test_add_with_a_main_revision(with_v1):
    tiny = settings.EMBEDDINGS["MODELS"]["tiny"]
    with pytest.MonkeyPatch.context() as patch:
        override_models(patch, floating={**tiny, "revision": "main"})
        assert_refused(["add", TARGET, "v3", "--model", "floating"], '"main", a moving branch')


def test_add_with_declared_dimensions_that_differ_from_the_model(with_v1):
    tiny = settings.EMBEDDINGS["MODELS"]["tiny"]
    with pytest.MonkeyPatch.context() as patch:
        override_models(patch, wrongdims={**tiny, "dimensions": 384})
        assert_refused(["add", TARGET, "v3", "--model", "wrongdims"],
                       "declares 384 dimensions but the model outputs 32")


def test_search_vector_with_another_version_or_dimension(with_v1):
    before = database_state()
    with pytest.raises(VersionMismatch, match='vector is of version "v2"'):
        Article.embedding.search_vector(np.ones(32, dtype=np.float32), version="v2")
    with pytest.raises(VersionMismatch, match="stores 32 dimensions"):
        Article.embedding.search_vector(np.ones(384, dtype=np.float32), version="v1")
    assert len(Article.embedding.search_vector(np.ones(32, dtype=np.float32), version="v1")) == 10
    assert database_state() == before


def test_model_files_changed_after_add(make_articles, tmp_path: Path):
    """A model whose files change after `add` is refused (FingerprintMismatch): backfill writes
    nothing and a save does not dual-write."""
    make_articles(6)
    folder = tmp_path / "copied-model"
    shutil.copytree(settings.EMBEDDINGS["MODELS"]["tiny"]["model"], folder)
    with pytest.MonkeyPatch.context() as patch:
        override_models(patch, copied={"model": str(folder), "revision": "copy-1"})
        call_command("embeddings", "add", TARGET, "v1", "--model", "copied")
        call_command("embeddings", "backfill", TARGET, "v1", "--inline")
        call_command("embeddings", "activate", TARGET, "v1", "--force")
        call_command("embeddings", "add", TARGET, "v2", "--model", "copied")

        weights = folder / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF  # one flipped bit in the last weight
        weights.write_bytes(bytes(data))

        assert_refused(["backfill", TARGET, "v2", "--inline"], "changed since the version was added")
        article = Article.objects.first()
        stored_before = article.embedding.vector("v1")
        article.body = "A completely different text."
        with pytest.raises(FingerprintMismatch):
            article.save()
        assert np.array_equal(article.embedding.vector("v1"), stored_before)
        with pytest.raises(FingerprintMismatch):
            Article.embedding.search("anything")
    encoders.clear_cache()


def test_refusal_from_the_command_line_exits_non_zero_with_one_line(with_v1, transactional_db):
    """The real `manage.py` process: exit status 1 and a single line on stderr."""
    lifecycle.retire(TARGET, "v2")  # committed: the subprocess sees it
    before = database_state()
    result = subprocess.run(
        [sys.executable, "manage.py", "embeddings", "drop", TARGET, "v1", "--yes"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "DATABASE_URL": database_url(),
             "DJANGO_SETTINGS_MODULE": "tests.settings"},
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        "CommandError: news.Article.embedding@v1 is active and cannot be dropped; "
        "activate another version first."
    ]
    assert database_state() == before
