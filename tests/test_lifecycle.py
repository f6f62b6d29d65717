"""The whole version lifecycle on real PostgreSQL + pgvector with real models (issue 2)."""

from __future__ import annotations

import numpy as np
import pytest
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext

from embeddings_app import encoders, lifecycle
from embeddings_app.config import get_config
from embeddings_app.models import EmbeddingVersion, State
from project.news.models import Article
from tests.conftest import TARGET

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("layout")]  # both layouts


def backfill_inline(version: str) -> None:
    call_command("embeddings", "backfill", TARGET, version, "--inline")


def brute_force_top_k(alias: str, query: str, k: int) -> list[int]:
    """Exact cosine ranking over every row, computed in numpy with a fresh encode."""
    encoder = encoders.load(get_config().model(alias))
    rows = list(Article.objects.order_by("pk"))
    doc_vectors = encoder.encode_documents([row.embedding.text for row in rows])
    query_vector = encoder.encode_query(query)
    doc_vectors /= np.linalg.norm(doc_vectors, axis=1, keepdims=True)
    query_vector /= np.linalg.norm(query_vector)
    similarity = doc_vectors @ query_vector
    order = np.lexsort((np.array([row.pk for row in rows]), -similarity))
    return [rows[i].pk for i in order[:k]]


def test_search_returns_the_exact_brute_force_top_10_with_minilm(make_articles):
    make_articles(150)
    call_command("embeddings", "add", TARGET, "v1", "--model", "minilm")
    backfill_inline("v1")
    call_command("embeddings", "activate", TARGET, "v1", "--force")  # gates: test_cutover.py

    for query in ("mobile phone sales", "election campaign promises", "football transfer"):
        found = [article.pk for article in Article.embedding.search(query, k=10)]
        assert found == brute_force_top_k("minilm", query, 10), query


def test_saving_new_text_while_v2_backfills_updates_both_versions(make_articles):
    articles = make_articles(20)
    call_command("embeddings", "add", TARGET, "v1", "--model", "minilm")
    backfill_inline("v1")
    call_command("embeddings", "activate", TARGET, "v1", "--force")  # gates: test_cutover.py
    call_command("embeddings", "add", TARGET, "v2", "--model", "tiny")
    v2 = EmbeddingVersion.objects.get(target=TARGET, version="v2")
    lifecycle.transition(v2, State.BACKFILLING, note="test: backfill under way")

    article = articles[3]
    article.title = "Astronomers find water ice on a distant moon"
    article.body = "The probe's spectrometer saw frozen water under the crust."
    article.save()

    text = article.embedding.text
    for version, alias in (("v1", "minilm"), ("v2", "tiny")):
        fresh = encoders.load(get_config().model(alias)).encode_documents([text])[0]
        stored = article.embedding.vector(version=version)
        cosine = float(stored @ fresh / np.linalg.norm(stored) / np.linalg.norm(fresh))
        assert cosine > 0.9999, (version, cosine)


def test_saving_an_unchanged_source_costs_no_encode(make_articles):
    article = make_articles(3)[0]
    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny")
    backfill_inline("v1")
    encoder = encoders.load(get_config().model("tiny"))
    calls = encoder.calls

    article.category = "moved"  # not a source field
    article.save()
    article.save(update_fields=["category"])
    assert encoder.calls == calls

    article.body += " One more sentence."
    article.save()
    assert encoder.calls == calls + 1


def test_plain_queries_select_no_vector_column(make_articles):
    make_articles(5)
    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny")
    backfill_inline("v1")
    with CaptureQueriesContext(connection) as captured:
        list(Article.objects.all())
        Article.objects.get(pk=Article.objects.first().pk)
    assert len(captured) == 3
    for query in captured:
        assert "embedding_v1" not in query["sql"], query["sql"]
        assert "SELECT" in query["sql"]
