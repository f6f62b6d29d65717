"""`verify` (issue 4, acceptance 2) and the deploy check on the active version's model files
(acceptance 3), with a copy of a local model whose files the tests change."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError, SystemCheckError
from django.test import override_settings

from embeddings_app import lifecycle
from embeddings_app.models import EmbeddingVersion
from project.news.models import Article
from tests.conftest import TARGET
from tests.store_helpers import forget, set_vector_text, swap_vectors, vector_text

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("layout")]  # both layouts


def v1() -> EmbeddingVersion:
    return EmbeddingVersion.objects.get_version(TARGET, "v1")


@pytest.fixture
def copied_model(tmp_path):
    """A private copy of the tiny model behind alias "mine", so a test can change its files."""
    folder = tmp_path / "mine"
    shutil.copytree(settings.TEST_MODELS_DIR / "tiny-bert", folder)
    models = {**settings.EMBEDDINGS["MODELS"], "mine": {"model": str(folder), "revision": "r1"}}
    with override_settings(EMBEDDINGS={**settings.EMBEDDINGS, "MODELS": models}):
        yield folder


@pytest.fixture
def backfilled(make_articles, copied_model):
    articles = make_articles(40)
    call_command("embeddings", "add", TARGET, "v1", "--model", "mine")
    call_command("embeddings", "backfill", TARGET, "v1", "--inline")
    return articles


def replace_weights(folder):
    """Change the model files: the weights of another random model (same architecture)."""
    other = settings.TEST_MODELS_DIR / "tiny-bert-seed1"
    for path in other.rglob("*.safetensors"):
        shutil.copy(path, folder / path.relative_to(other))


def verify_fails(*extra: str) -> str:
    with pytest.raises(CommandError) as failure:
        call_command("embeddings", "verify", TARGET, "v1", *extra)
    return str(failure.value)


def test_verify_passes_on_a_freshly_backfilled_version_and_records_it(backfilled, capsys):
    call_command("embeddings", "verify", TARGET, "v1")
    out = capsys.readouterr().out
    assert "verify PASSED for news.Article.embedding@v1: 40 sampled vectors match" in out
    version = EmbeddingVersion.objects.get(target=TARGET, version="v1")
    assert version.verify_passed is True and version.verified_at is not None
    report = version.verify_report
    assert report["compared"] == 40 and report["below_threshold"] == 0
    assert report["min_cosine"] > 0.999 and report["problems"] == []


def test_verify_sample_size_is_honoured(backfilled):
    report = lifecycle.verify(TARGET, "v1", sample=7)
    assert report.passed and report.sampled == 7 and report.compared == 7


def test_verify_fails_when_the_model_files_changed(backfilled, copied_model):
    replace_weights(copied_model)
    message = verify_fails()
    assert message.startswith("verify FAILED for news.Article.embedding@v1: model files changed")
    assert "vectors differ" in message  # the new weights also compute other vectors
    assert EmbeddingVersion.objects.get(target=TARGET, version="v1").verify_passed is False


def test_verify_fails_when_vectors_were_tampered_with_in_sql(backfilled):
    victims = [backfilled[3].pk, backfilled[17].pk]
    # Swap two rows' vectors: each still a plausible unit vector, just the wrong one.
    swap_vectors(v1(), *victims)
    message = verify_fails()
    assert "vectors differ: 2 of 40 sampled vectors are below cosine 0.999" in message
    assert str(victims[0]) in message and "coverage" not in message and "stale" not in message


def test_verify_fails_for_rows_without_vectors(backfilled):
    pks = [article.pk for article in backfilled[:3]]
    forget(v1(), pks)
    message = verify_fails()
    assert "coverage: 3 of 40 rows have no vector" in message


def test_verify_fails_for_rows_changed_by_queryset_update(backfilled):
    Article.objects.filter(pk__in=[a.pk for a in backfilled[:5]]).update(title="Edited behind")
    message = verify_fails()
    assert "stale: 5 rows changed since their embedding (e.g. QuerySet.update()" in message
    # A sync brings them back: verify passes again.
    Article.embedding.sync(Article.objects.all())
    call_command("embeddings", "verify", TARGET, "v1")


def test_verify_threshold_is_configurable(backfilled):
    # A tiny perturbation of one vector: cosine ~0.99.
    text = vector_text(v1(), backfilled[0].pk)
    vector = np.array([float(x) for x in text.strip("[]").split(",")])
    noisy = vector + np.random.default_rng(0).normal(0, 0.1 * np.abs(vector).mean(), len(vector))
    set_vector_text(v1(), backfilled[0].pk, str(noisy.tolist()))
    assert "vectors differ: 1 of 40" in verify_fails()
    call_command("embeddings", "verify", TARGET, "v1", "--threshold", "0.9")


def test_verify_against_another_alias_answers_whether_a_reindex_is_needed(backfilled):
    # Same files under another alias: no re-index needed; another model: needed.
    same = {"model": str(settings.TEST_MODELS_DIR / "tiny-bert"), "revision": "x"}
    models = {**settings.EMBEDDINGS["MODELS"], "same": same}
    with override_settings(EMBEDDINGS={**settings.EMBEDDINGS, "MODELS": models}):
        assert lifecycle.verify(TARGET, "v1", model="same").passed
        report = lifecycle.verify(TARGET, "v1", model="tiny_other")
    assert not report.passed and "vectors differ: 40 of 40" in report.problems[0]
    # Checking another alias does not record a verdict on the version.
    assert EmbeddingVersion.objects.get(target=TARGET, version="v1").verified_at is None


def test_check_deploy_reports_a_changed_model_behind_the_active_version(backfilled,
                                                                        copied_model):
    call_command("embeddings", "activate", TARGET, "v1", "--force")
    call_command("check", "--deploy")  # no error while the files match
    replace_weights(copied_model)
    with pytest.raises(SystemCheckError) as failure:
        call_command("check", "--deploy")
    message = str(failure.value)
    assert "embeddings.E101" in message
    assert "The model files behind active version news.Article.embedding@v1" in message
    call_command("check")  # without --deploy the (slow, file-hashing) check does not run
