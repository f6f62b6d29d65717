"""Dual-write modes: ``sync`` (fresh when save returns), ``on_commit`` (fresh after commit) and
``celery`` (fresh once a worker ran the task). Until then a row is stale and search keeps using
its previous vector."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from django.core.management import call_command
from django.db import transaction

from embeddings_app import encoders, registry, stores
from embeddings_app.models import EmbeddingVersion
from project.news.models import Article
from tests.backfill_helpers import wait_until
from tests.conftest import TARGET

pytestmark = pytest.mark.usefixtures("layout")  # both layouts

NEW_TITLE = "Completely different: a recipe for lemon cake with poppy seeds"


@pytest.fixture
def active_v1(make_articles):
    articles = make_articles(12)
    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny")
    call_command("embeddings", "backfill", TARGET, "v1", "--inline")
    call_command("embeddings", "activate", TARGET, "v1", "--force")
    return articles


def _stored(article: Article) -> tuple[np.ndarray, bytes]:
    field = registry.get(TARGET)
    version = EmbeddingVersion.objects.get(target=TARGET, version="v1")
    hashes = stores.stored_hashes(field, [version], [article.pk])[article.pk]
    return version.store.read_vector(article.pk), hashes[0]


def _encode(text: str) -> np.ndarray:
    version = EmbeddingVersion.objects.get(target=TARGET, version="v1")
    return encoders.for_version(version).encode_documents([text])[0]


def _edit(article: Article) -> tuple[str, str]:
    old = article.embedding.text
    article.title = NEW_TITLE
    return old, article.embedding.text


def _assert_stale_but_searchable(article: Article, old_text: str) -> None:
    """A stale row keeps its previous vector and hash: search finds it by its old text."""
    vector, source_hash = _stored(article)
    field = registry.get(TARGET)
    assert source_hash == field.source_hash(old_text)
    np.testing.assert_allclose(vector, _encode(old_text), atol=2e-5)
    hits = Article.embedding.search(old_text, k=1)
    assert hits[0].pk == article.pk and hits[0].distance < 1e-4


def _assert_fresh(article: Article, new_text: str) -> None:
    vector, source_hash = _stored(article)
    assert source_hash == registry.get(TARGET).source_hash(new_text)
    np.testing.assert_allclose(vector, _encode(new_text), atol=2e-5)
    assert Article.embedding.search(new_text, k=1)[0].pk == article.pk


@pytest.mark.django_db(transaction=True)
def test_sync_mode_row_is_fresh_when_save_returns(active_v1, settings):
    settings.EMBEDDINGS = {**settings.EMBEDDINGS, "DUAL_WRITE": "sync"}
    article = active_v1[3]
    _, new_text = _edit(article)
    with transaction.atomic():
        article.save()
        _assert_fresh(article, new_text)  # inside the saving transaction already
    _assert_fresh(article, new_text)


@pytest.mark.django_db(transaction=True)
def test_on_commit_mode_row_is_stale_until_commit(active_v1, settings):
    settings.EMBEDDINGS = {**settings.EMBEDDINGS, "DUAL_WRITE": "on_commit"}
    article = active_v1[4]
    old_text, new_text = _edit(article)
    with transaction.atomic():
        article.save()
        _assert_stale_but_searchable(article, old_text)
    _assert_fresh(article, new_text)


@pytest.mark.worker
def test_celery_mode_row_is_stale_until_a_worker_refreshes_it(active_v1, settings, celery_worker,
                                                              capsys):
    settings.EMBEDDINGS = {**settings.EMBEDDINGS, "DUAL_WRITE": "celery",
                           "QUEUE": f"embeddings-{uuid.uuid4().hex[:8]}"}
    article = active_v1[5]
    old_text, new_text = _edit(article)
    article.save()  # committed; the refresh task waits in the queue: no worker yet
    _assert_stale_but_searchable(article, old_text)
    capsys.readouterr()
    call_command("embeddings", "status", TARGET)
    status_line = next(line for line in capsys.readouterr().out.splitlines()
                       if line.startswith(TARGET))
    assert status_line.split()[7:9] == ["12/12", "1"]  # coverage, stale

    worker = celery_worker(concurrency=1)
    field = registry.get(TARGET)
    wait_until(lambda: _stored(article)[1] == field.source_hash(new_text),
               what="the worker to refresh the row")
    assert "embeddings_app.refresh_rows" in worker.log()
    _assert_fresh(article, new_text)
