"""The async API (``asearch``, ``asearch_vector``, ``avector``) under a real ASGI server (uvicorn
serving Django's ASGI application in this process, views in tests/async_urls.py) with concurrent
HTTP requests: each search is one snapshot of the active version, never a mix, while the active
version flips under it; requests run concurrently, not one at a time."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import uvicorn
from django.core.asgi import get_asgi_application
from django.core.management import call_command

from embeddings_app import encoders, lifecycle, search
from embeddings_app.models import EmbeddingVersion
from project.news.models import Article
from tests.conftest import TARGET

pytestmark = [pytest.mark.urls("tests.async_urls"), pytest.mark.timeout(600)]

QUERIES = ["stock market shares", "football cup final", "mobile phone networks", "general election",
           "film award ceremony", "oil prices"]


@pytest.fixture
def asgi_server(transactional_db: None, settings: Any) -> Iterator[str]:
    """uvicorn serving Django's ASGI application on 127.0.0.1 (a free port), in a thread."""
    settings.ROOT_URLCONF = "tests.async_urls"
    settings.ALLOWED_HOSTS = ["127.0.0.1"]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(get_asgi_application(), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=30)
    sock.close()


def get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def prepare(version: str, alias: str) -> None:
    call_command("embeddings", "add", TARGET, version, "--model", alias)
    call_command("embeddings", "backfill", TARGET, version, "--inline")
    call_command("embeddings", "index", TARGET, version)


def cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 - float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_concurrent_async_searches_each_read_one_version_while_the_active_version_flips(
        asgi_server: str, make_articles: Any, settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings.EMBEDDINGS = {**settings.EMBEDDINGS, "ACTIVE_CACHE_TTL": 0.05}
    make_articles(40)
    prepare("v1", "tiny")
    prepare("v2", "tiny_other")
    lifecycle.activate(TARGET, "v1", force=True)
    versions = {name: EmbeddingVersion.objects.get_version(TARGET, name) for name in ("v1", "v2")}
    stored = {name: {a.pk: version.store.read_vector(a.pk) for a in Article.objects.all()}
              for name, version in versions.items()}
    query_vectors = {name: {q: encoders.for_version(version).encode_query(q) for q in QUERIES}
                     for name, version in versions.items()}

    # How many searches run at once: the async calls must not be serialized.
    in_flight, peak, lock = [0], [0], threading.Lock()
    original = search.search

    def counted(*args: Any, **kwargs: Any) -> list[Any]:
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        try:
            time.sleep(0.02)  # keeps overlapping searches overlapping long enough to be seen
            return original(*args, **kwargs)
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(search, "search", counted)

    stop = threading.Event()
    flips = [0]

    def flipper() -> None:
        from django.db import connection

        try:
            while not stop.is_set():
                lifecycle.activate(TARGET, "v2" if flips[0] % 2 == 0 else "v1", force=True)
                flips[0] += 1
                time.sleep(0.03)
        finally:
            connection.close()

    urls = [f"{asgi_server}/search?" + urllib.parse.urlencode({"q": q, "k": 8}) for q in QUERIES]
    responses: list[tuple[str, dict[str, Any]]] = []
    thread = threading.Thread(target=flipper)
    thread.start()
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            for _ in range(6):
                batch = [urls[i % len(urls)] for i in range(24)]
                for url, body in zip(batch, pool.map(get, batch), strict=True):
                    responses.append((urllib.parse.parse_qs(url.split("?", 1)[1])["q"][0], body))
    finally:
        stop.set()
        thread.join()

    seen = set()
    for query, body in responses:
        results = body["results"]
        assert len(results) == 8
        names = {r["version"] for r in results}
        assert len(names) == 1, f"a search mixed versions: {results}"
        name = names.pop()
        seen.add(name)
        for r in results:  # the distance is the query embedded by *that* version's model
            expected = cosine_distance(query_vectors[name][query], stored[name][r["pk"]])
            assert abs(r["distance"] - expected) < 1e-4, (query, name, r, expected)
    assert seen == {"v1", "v2"} and flips[0] >= 2, (seen, flips[0])
    assert peak[0] >= 2, f"async searches ran one at a time (peak {peak[0]})"


def test_async_search_vector_and_avector_follow_the_active_version(
        asgi_server: str, make_articles: Any) -> None:
    articles = make_articles(12)
    prepare("v1", "tiny")
    lifecycle.activate(TARGET, "v1", force=True)
    target = articles[3]
    stored = get(f"{asgi_server}/vector/{target.pk}")["vector"]
    version = EmbeddingVersion.objects.get_version(TARGET, "v1")
    assert np.allclose(stored, version.store.read_vector(target.pk))
    assert get(f"{asgi_server}/vector/{target.pk}?version=v1")["vector"] == stored

    status, body = post(f"{asgi_server}/search-vector", {"vector": stored, "version": "v1", "k": 3})
    assert status == 200
    assert body["results"][0]["pk"] == target.pk and body["results"][0]["distance"] < 1e-5
    assert {r["version"] for r in body["results"]} == {"v1"}

    status, body = post(f"{asgi_server}/search-vector", {"vector": stored, "version": "v2"})
    assert status == 409 and 'searches version "v1"' in body["error"]


def test_async_search_with_a_filtered_queryset_returns_only_its_rows(
        asgi_server: str, make_articles: Any) -> None:
    make_articles(40)
    prepare("v1", "tiny")
    lifecycle.activate(TARGET, "v1", force=True)
    category = Article.objects.values_list("category", flat=True).first()
    wanted = set(Article.objects.filter(category=category).values_list("pk", flat=True))
    body = get(f"{asgi_server}/search?" + urllib.parse.urlencode(
        {"q": "football cup final", "k": 5, "category": category}))
    pks = [r["pk"] for r in body["results"]]
    assert pks and set(pks) <= wanted and len(pks) == min(5, len(wanted))
