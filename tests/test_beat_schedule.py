"""The README's Celery beat schedule ("Periodic work"), read from the README itself: every entry
names a task the app registers, on the embeddings queue, with a schedule Celery accepts; and each
entry, dispatched by Celery beat's own scheduler code, runs on a real worker and does its work."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from celery import beat
from django.conf import settings
from django.core.management import call_command

from embeddings_app.fields import VersionedEmbedding
from embeddings_app.models import EmbeddingVersion
from project.celery import app
from project.news.models import Article
from tests.conftest import TARGET
from tests.workers import ROOT

README = ROOT / "README.md"
BLOCK = re.compile(r"^```python beat-schedule\s*\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)


def readme_schedule() -> dict[str, dict[str, Any]]:
    blocks = BLOCK.findall(README.read_text())
    assert len(blocks) == 1, "the README has no (or more than one) beat-schedule block"
    namespace: dict[str, Any] = {}
    exec(blocks[0], namespace)
    return namespace["CELERY_BEAT_SCHEDULE"]


def test_every_readme_beat_entry_names_a_registered_task_on_the_embeddings_queue() -> None:
    app.loader.import_default_modules()  # autodiscover the INSTALLED_APPS' tasks, as beat does
    schedule = readme_schedule()
    tasks = {entry["task"] for entry in schedule.values()}
    assert {"embeddings_app.sweep", "embeddings_app.probe", "embeddings_app.reclaim",
            "embeddings_app.drain"} <= tasks
    for name, entry in schedule.items():
        assert entry["task"] in app.tasks, f"{name}: {entry['task']} is not a registered task"
        assert entry["options"]["queue"] == settings.EMBEDDINGS["QUEUE"]
        parsed = beat.ScheduleEntry(name=name, app=app, **entry)
        assert parsed.schedule.run_every.total_seconds() == entry["schedule"] > 0


def _wait_for(worker: Any, task: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    pattern = re.compile(rf"Task {re.escape(task)}\[[^\]]+\] succeeded")
    while not pattern.search(worker.log()):
        assert "Traceback" not in worker.log(), worker.log()
        assert time.monotonic() < deadline, f"{task} did not succeed:\n{worker.log()}"
        time.sleep(0.3)


@pytest.mark.worker
def test_each_readme_beat_entry_sent_by_the_beat_scheduler_runs_on_a_real_worker(
        celery_worker: Any, make_articles: Any) -> None:
    articles = make_articles(8)
    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny")
    call_command("embeddings", "backfill", TARGET, "v1", "--inline")
    # A change the save signal never sees: the sweep must find it.
    Article.objects.filter(pk=articles[0].pk).update(title="Changed behind the app's back")
    version = EmbeddingVersion.objects.get_version(TARGET, "v1")
    field = Article.embedding
    assert isinstance(field, VersionedEmbedding)
    fresh_hash = field.source_hash(field.source_text(Article.objects.get(pk=articles[0].pk)))
    assert version.store.read_all()[articles[0].pk][1] != fresh_hash  # stale until the sweep
    probed_before = version.probed_at
    worker = celery_worker(concurrency=1)

    app.loader.import_default_modules()
    scheduler = beat.Scheduler(app=app, lazy=True)
    scheduler.update_from_dict(readme_schedule())
    for entry in scheduler.schedule.values():
        scheduler.apply_async(entry, advance=False)  # what beat does when an entry is due
        _wait_for(worker, entry.task)

    assert version.store.read_all()[articles[0].pk][1] == fresh_hash  # the sweep re-embedded it
    version.refresh_from_db()
    assert version.probed_at is not None and version.probe_passed is True  # the probe ran
    assert probed_before is None or version.probed_at > probed_before
