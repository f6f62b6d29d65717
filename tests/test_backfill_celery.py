"""The default backfill dispatches Celery batch tasks to a real worker and follows them."""

from __future__ import annotations

import pytest
from django.core.management import call_command

from embeddings_app.models import BackfillRun, EmbeddingVersion, State
from tests.conftest import TARGET

pytestmark = pytest.mark.usefixtures("layout")  # both layouts


@pytest.mark.worker
def test_default_backfill_runs_on_real_worker_processes(make_articles, celery_worker, capsys):
    make_articles(120)
    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny")
    worker = celery_worker(concurrency=2)

    call_command("embeddings", "backfill", TARGET, "v1", "--batch-size", "25")

    version = EmbeddingVersion.objects.get(target=TARGET, version="v1")
    run = BackfillRun.objects.get(version=version)
    assert version.state == State.READY
    assert (run.status, run.mode, run.batches_total, run.batches_done) == ("done", "celery", 5, 5)
    assert (run.rows_processed, run.rows_embedded) == (120, 120)
    assert version.store.coverage() == (120, 120)
    assert "embeddings_app.backfill_batch" in worker.log()
    assert "Backfill of news.Article.embedding@v1 done: 120 embedded" in capsys.readouterr().out
