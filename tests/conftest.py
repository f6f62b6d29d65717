"""Shared fixtures: real PostgreSQL + pgvector (embedded unless DATABASE_URL is set), real models,
real Celery workers on a real broker."""

from __future__ import annotations

import copy
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from django.conf import settings

from embeddings_app import active, registry, stores
from project.news.corpus import iter_articles
from project.news.models import Article
from tests import packaging
from tests.embedding_servers import FaultServer, InfinityServer
from tests.tinymodel import build_tiny_model
from tests.workers import ROOT, WorkerProcess

TARGET = "news.Article.embedding"


@pytest.fixture(scope="session", autouse=True)
def tiny_models() -> None:
    """The locally made models of tests/settings.py, built once (deterministic)."""
    tokenizer = Path(settings.EMBEDDINGS["MODELS"]["minilm"]["model"])
    build_tiny_model(settings.TEST_MODELS_DIR / "tiny-bert", tokenizer, seed=0)
    build_tiny_model(settings.TEST_MODELS_DIR / "tiny-bert-seed1", tokenizer, seed=1)


@pytest.fixture(autouse=True)
def close_rate_limiter_connection() -> Iterator[None]:
    """The API rate limiter's own database connection (embeddings_app.ratelimit) is closed after
    each test, so the test database can be dropped at the end."""
    yield
    from embeddings_app import ratelimit

    ratelimit.close()


@pytest.fixture(autouse=True)
def fresh_active_snapshots() -> Iterator[None]:
    """Each test starts with no cached active version (embeddings_app.active): a snapshot of an
    earlier test's database state must not serve this test's searches."""
    active.invalidate()
    yield
    active.invalidate()


@pytest.fixture(params=["column", "table"])
def layout(request: pytest.FixtureRequest, settings: object) -> str:
    """Run the test once per layout: ``EMBEDDINGS["LAYOUT"]``, the layout of every version the
    test adds without naming one. A suite opts in with ``pytestmark =
    pytest.mark.usefixtures("layout")``."""
    settings.EMBEDDINGS = {**settings.EMBEDDINGS, "LAYOUT": request.param}  # type: ignore[attr-defined]
    return request.param


@pytest.fixture(autouse=True)
def drop_version_stores(request: pytest.FixtureRequest, django_db_blocker: object) -> Iterator[None]:
    """Columns and tables added by `embeddings add` are not models: a transactional test leaves
    them behind, so drop them (and their indexes) after each test."""
    yield
    if "django_db_setup" not in request.fixturenames and not request.node.get_closest_marker(
        "django_db"
    ):
        return  # the test used no database (never touch the development one)
    # After a rolled-back test this finds nothing: the DDL was rolled back with it.
    with django_db_blocker.unblock():  # type: ignore[attr-defined]
        for target in registry.all_targets():
            stores.drop_leftovers(registry.get(target))


@pytest.fixture
def transactional_db(transactional_db: None, django_db_blocker: object) -> Iterator[None]:
    """pytest-django's, with the version stores dropped before its flush: a side table's foreign
    key would make the flush's TRUNCATE of the embedded table fail. (Tests marked
    ``django_db(transaction=True)`` get the same from ``drop_version_stores``, which pytest tears
    down before the marker's flush.)"""
    yield
    with django_db_blocker.unblock():  # type: ignore[attr-defined]
        for target in registry.all_targets():
            stores.drop_leftovers(registry.get(target))


@pytest.fixture
def make_articles(db: None) -> Callable[[int], list[Article]]:
    """Create N real BBC News articles (title + body), in a stable order."""

    def make(count: int) -> list[Article]:
        articles = [
            Article(title=item.title, body=item.body, category=item.category)
            for item in iter_articles(count)
        ]
        return Article.objects.bulk_create(articles)

    return make


@pytest.fixture
def celery_worker(transactional_db: None) -> Iterator[Callable[..., WorkerProcess]]:
    """Start real worker processes: ``celery_worker(concurrency=2)``; all are stopped after."""
    workers: list[WorkerProcess] = []

    def start(**kwargs: object) -> WorkerProcess:
        worker = WorkerProcess(**kwargs)  # type: ignore[arg-type]
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


def _point_aliases_at(url: str, env_name: str, aliases: tuple[str, ...],
                      extra_env: dict[str, str] | None = None) -> Callable[[], None]:
    """Point ``aliases`` at a server started by the session: this process's settings and the
    environment that worker processes started later read (tests/settings.py). Returns undo."""
    from django.test.utils import override_settings

    saved = {name: os.environ.get(name) for name in [env_name, *(extra_env or {})]}
    os.environ.update({env_name: url, **(extra_env or {})})
    value = copy.deepcopy(settings.EMBEDDINGS)
    for alias in aliases:
        value["MODELS"][alias]["base_url"] = url
    override = override_settings(EMBEDDINGS=value)
    override.enable()

    def undo() -> None:
        override.disable()
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old

    return undo


@pytest.fixture(scope="session")
def infinity_server() -> Iterator[InfinityServer]:
    """infinity-emb serving the packaged all-MiniLM-L6-v2, started once (alias "api_minilm").
    Without its virtualenv the tests fail (never skip): `make test` builds it."""
    server = InfinityServer(settings.EMBEDDINGS["MODELS"]["minilm"]["model"],
                            ROOT / "test-artifacts" / "infinity.log")
    undo = _point_aliases_at(server.url, "EMBEDDINGS_TEST_INFINITY_URL", ("api_minilm",))
    yield server
    undo()
    server.stop()


@pytest.fixture(scope="session")
def fault_server_session() -> Iterator[FaultServer]:
    key = f"sk-test-{secrets.token_hex(16)}"
    server = FaultServer(api_key=key)
    undo = _point_aliases_at(server.url, "EMBEDDINGS_TEST_FAULT_URL", ("api_fault", "api_limited"),
                             {"EMBEDDINGS_TEST_FAULT_KEY": key})
    yield server
    undo()
    server.stop()


@pytest.fixture
def fault_server(fault_server_session: FaultServer) -> Iterator[FaultServer]:
    """The fault server (aliases "api_fault" and "api_limited"), its log and script cleared."""
    from embeddings_app import encoders

    fault_server_session.reset()
    encoders.clear_cache()
    yield fault_server_session
    fault_server_session.reset()


@pytest.fixture(scope="session")
def dists(tmp_path_factory: pytest.TempPathFactory) -> packaging.Dists:
    """This repository's sdist and wheel, built once per session (``python -m build``)."""
    return packaging.build(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="session")
def wheel_venv(dists: packaging.Dists, tmp_path_factory: pytest.TempPathFactory) -> packaging.WheelEnv:
    """A new virtualenv with the app installed from the wheel only (tests/packaging.py)."""
    return packaging.wheel_env(tmp_path_factory.mktemp("wheel-venv") / "venv", dists.wheel)
