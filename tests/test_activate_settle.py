"""activate tells a write in flight (row saved, dual-write not yet committed) from a real gap."""

from __future__ import annotations

import threading
import time

import pytest
from django.core.management import call_command
from django.db import connection

from embeddings_app import lifecycle
from embeddings_app.models import EmbeddingVersion
from project.news.models import Article
from tests.conftest import TARGET
from tests.store_helpers import forget

pytestmark = pytest.mark.usefixtures("layout")  # both layouts


def blank_v2(title: str) -> None:
    forget(EmbeddingVersion.objects.get_version(TARGET, "v2"),
           list(Article.objects.filter(title=title).values_list("pk", flat=True)))


@pytest.mark.django_db(transaction=True)
def test_a_row_completed_within_the_settle_time_does_not_refuse(make_articles):
    make_articles(15)
    call_command("embeddings", "add", TARGET, "v2", "--model", "tiny")
    call_command("embeddings", "backfill", TARGET, "v2", "--inline")
    Article.objects.create(title="In flight", body="Saved; its dual-write commits a moment later.")
    blank_v2("In flight")  # the state between the INSERT's commit and the dual-write's commit
    v2 = EmbeddingVersion.objects.get(target=TARGET, version="v2")
    assert lifecycle.readiness(v2).problems == ["1 of 16 rows have no vector"]

    def dual_write_commits() -> None:
        time.sleep(lifecycle.SETTLE_SECONDS / 4)
        Article.embedding.sync(Article.objects.filter(title="In flight"))
        connection.close()

    writer = threading.Thread(target=dual_write_commits)
    writer.start()
    try:
        assert lifecycle.readiness(v2, settle=True).problems == []
    finally:
        writer.join()


@pytest.mark.django_db
def test_a_row_still_missing_after_the_settle_time_refuses(make_articles):
    make_articles(15)
    call_command("embeddings", "add", TARGET, "v2", "--model", "tiny")
    call_command("embeddings", "backfill", TARGET, "v2", "--inline")
    Article.objects.create(title="Really missing", body="Its dual-write never happened.")
    blank_v2("Really missing")
    v2 = EmbeddingVersion.objects.get(target=TARGET, version="v2")
    started = time.monotonic()
    assert lifecycle.readiness(v2, settle=True).problems == ["1 of 16 rows have no vector"]
    assert time.monotonic() - started >= lifecycle.SETTLE_SECONDS
