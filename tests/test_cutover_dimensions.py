"""Dimension changes end to end (issue 4, acceptance 7): 384 -> 256 (truncate_dim), and tiny
local models projecting to 768 dimensions (vector) and 3,072 dimensions (halfvec)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import connection
from django.test import override_settings

from embeddings_app import encoders, indexes
from embeddings_app.models import EmbeddingVersion
from project.news.models import Article
from tests.conftest import TARGET
from tests.store_helpers import vector_type

pytestmark = pytest.mark.django_db(transaction=True)  # CREATE INDEX CONCURRENTLY


def build_dense_model(target: Path, base: Path, dimensions: int) -> Path:
    """The tiny model of tests/tinymodel.py plus a Dense layer to ``dimensions`` outputs."""
    if (target / "modules.json").exists():
        return target
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense

    torch.manual_seed(dimensions)
    model = SentenceTransformer(str(base), device="cpu")
    model.append(Dense(model.get_embedding_dimension(), dimensions))
    tmp = target.with_name(target.name + ".building")
    model.save(str(tmp))
    tmp.rename(target)
    return target


@pytest.fixture(scope="module")
def dense_models() -> dict:
    base = settings.TEST_MODELS_DIR / "tiny-bert"
    models = {**settings.EMBEDDINGS["MODELS"]}
    for dims in (768, 3072):
        folder = build_dense_model(settings.TEST_MODELS_DIR / f"tiny-dense-{dims}", base, dims)
        models[f"tiny{dims}"] = {"model": str(folder), "revision": f"dense-{dims}"}
    return {**settings.EMBEDDINGS, "MODELS": models}


def exact_top(version: EmbeddingVersion, query: str, k: int) -> list[int]:
    rows = list(Article.objects.order_by("pk"))
    stored = np.vstack([version.store.read_vector(r.pk) for r in rows])
    vector = encoders.for_version(version).encode_query(query)
    similarity = stored @ vector / np.linalg.norm(stored, axis=1) / np.linalg.norm(vector)
    return [rows[i].pk for i in np.argsort(-similarity, kind="stable")[:k]]


def go_through(version: str, alias: str) -> EmbeddingVersion:
    for step in (("add", TARGET, version, "--model", alias),
                 ("backfill", TARGET, version, "--inline"),
                 ("index", TARGET, version, "--ef-search", "100"),
                 ("verify", TARGET, version),
                 ("activate", TARGET, version)):
        call_command("embeddings", *step)
    return EmbeddingVersion.objects.get(target=TARGET, version=version)


def test_384_to_256_with_truncate_dim_and_back(make_articles):
    make_articles(40)
    v1 = go_through("v1", "minilm")
    call_command("embeddings", "migrate", TARGET, "--to", "minilm256", "--inline")
    v2 = EmbeddingVersion.objects.get(target=TARGET, version="v2")
    assert (v1.dimensions, v2.dimensions) == (384, 256)
    assert vector_type(v2) == "vector(256)"
    found = Article.embedding.search("bank interest rates", k=5)
    assert {obj.embedding_version for obj in found} == {"v2"}
    assert [obj.pk for obj in found] == exact_top(v2, "bank interest rates", 5)
    call_command("embeddings", "rollback", TARGET)
    found = Article.embedding.search("bank interest rates", k=5)
    assert [obj.pk for obj in found] == exact_top(v1, "bank interest rates", 5)
    assert {obj.embedding_version for obj in found} == {"v1"}


@pytest.mark.parametrize(("alias", "storage_type"), [("tiny768", "vector"),
                                                      ("tiny3072", "halfvec")])
def test_768_and_3072_dimension_versions_end_to_end(make_articles, dense_models, alias,
                                                     storage_type, layout):
    make_articles(40)
    with override_settings(EMBEDDINGS={**dense_models, "LAYOUT": layout}):
        go_through("v1", "tiny")
        version = go_through("v2", alias)
        dims = int(alias.removeprefix("tiny"))
        assert (version.dimensions, version.storage) == (dims, storage_type)
        assert version.layout == layout
        assert vector_type(version) == f"{storage_type}({dims})"
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_get_indexdef(%s::regclass)", [indexes.index_name(version)])
            definition = cursor.fetchone()[0]
        assert f"ON public.{version.store.relation} USING hnsw" in definition
        assert f"{version.store.vector_column} {storage_type}_cosine_ops" in definition
        found = Article.embedding.search("football match", k=5)
        assert {obj.embedding_version for obj in found} == {"v2"}
        assert [obj.pk for obj in found] == exact_top(version, "football match", 5)
        vector = Article.objects.first().embedding.vector()
        assert vector.shape == (dims,)
