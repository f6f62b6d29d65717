"""Writes that bypass save signals (QuerySet.update(), bulk_update) are fixed by
``Article.embedding.sync(queryset)`` and by the periodic sweep task."""

from __future__ import annotations

import uuid

import pytest
from django.core.management import call_command
from django.db.models import Value
from django.db.models.functions import Concat

from embeddings_app import registry, sync, tasks
from embeddings_app.models import EmbeddingVersion
from project.news.models import Article
from tests.backfill_helpers import assert_every_row_fresh, wait_until
from tests.conftest import TARGET

pytestmark = pytest.mark.usefixtures("layout")  # both layouts


def _stale(version_name: str = "v1") -> int:
    field = registry.get(TARGET)
    return sync.count_stale(field, [EmbeddingVersion.objects.get(target=TARGET,
                                                                  version=version_name)])[0]


def _bypass_signals(articles: list[Article]) -> tuple[list[int], list[int]]:
    updated = [a.pk for a in articles[:5]]
    Article.objects.filter(pk__in=updated).update(title=Concat("title", Value(" (updated)")))
    bulk = articles[5:10]
    for article in bulk:
        article.body = f"Rewritten by a bulk import: {article.body[:200]}"
    Article.objects.bulk_update(bulk, ["body"])
    return updated, [a.pk for a in bulk]


@pytest.fixture
def backfilled(make_articles):
    articles = make_articles(30)
    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny")
    call_command("embeddings", "backfill", TARGET, "v1", "--inline")
    assert _stale() == 0
    return articles


@pytest.mark.django_db(transaction=True)
def test_sync_queryset_and_sweep_fix_rows_written_without_signals(backfilled):
    updated, bulk = _bypass_signals(backfilled)
    assert _stale() == 10  # no signal: the stored hashes are those of the old texts

    assert Article.embedding.sync(Article.objects.filter(pk__in=[*updated, bulk[0]])) == 6
    assert _stale() == 4  # only the queryset's rows were re-embedded

    assert tasks.sweep() == {TARGET: 4, "news.Ticket.embedding": 0}
    assert _stale() == 0
    assert tasks.sweep() == {TARGET: 0, "news.Ticket.embedding": 0}  # nothing left to do
    assert assert_every_row_fresh(TARGET, "v1") == 30


@pytest.mark.worker
def test_sweep_task_runs_on_a_worker(backfilled, celery_worker, settings):
    settings.EMBEDDINGS = {**settings.EMBEDDINGS, "QUEUE": f"embeddings-{uuid.uuid4().hex[:8]}"}
    _bypass_signals(backfilled)
    assert _stale() == 10
    worker = celery_worker(concurrency=1)
    tasks.sweep.apply_async(kwargs={"target": TARGET}, queue=settings.EMBEDDINGS["QUEUE"])
    wait_until(lambda: _stale() == 0, what="the sweep to refresh the rows")
    assert "embeddings_app.sweep" in worker.log()
    assert assert_every_row_fresh(TARGET, "v1") == 30
