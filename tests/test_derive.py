"""`embeddings derive`: a version computed from another's vectors without running the model over
the table (truncated and re-normalized, or half precision), on the real MiniLM: the derived
vectors, their agreement with the model's own truncated output (verify), searches against brute
force on the derived vectors with the query transformed the same way, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
from django.core.management import CommandError, call_command

from embeddings_app import encoders, lifecycle
from embeddings_app.config import get_config
from embeddings_app.models import EmbeddingVersion, State
from project.news.models import Article
from tests.conftest import TARGET

pytestmark = pytest.mark.django_db(transaction=True)  # indexes are built CONCURRENTLY


@pytest.fixture
def parent(make_articles):
    """v1: MiniLM (384 dimensions) over 24 real articles, backfilled."""
    make_articles(24)
    call_command("embeddings", "add", TARGET, "v1", "--model", "minilm")
    call_command("embeddings", "backfill", TARGET, "v1", "--inline")
    return EmbeddingVersion.objects.get_version(TARGET, "v1")


def unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def test_derive_256_dimensions_truncates_renormalizes_and_searches_like_brute_force(
        parent, capsys):
    minilm256 = encoders.load(get_config().model("minilm256"))
    calls_before = minilm256.calls
    call_command("embeddings", "derive", TARGET, "v2", "--from", "v1", "--dimensions", "256",
                 "--sample", "8", "--inline")
    out = capsys.readouterr().out
    assert "Sample check passed: 8 sampled rows re-embedded: min cosine " in out
    assert f"Derived 24 vectors of {TARGET}@v1 as {TARGET}@v2" in out
    assert "Backfill of news.Article.embedding@v2 done: 0 embedded, 0 empty, 24 already fresh" in out
    v2 = EmbeddingVersion.objects.get_version(TARGET, "v2")
    assert (v2.model_alias, v2.dimensions, v2.storage, v2.state) == ("minilm256", 256, "vector",
                                                                     State.READY)
    assert "derived from news.Article.embedding@v1 (first 256 dimensions, re-normalized)" in \
        v2.events.first().note
    full, derived = parent.store.read_all(), v2.store.read_all()
    for pk, (vector, source_hash) in full.items():
        np.testing.assert_allclose(derived[pk][0], unit(vector[:256]), rtol=1e-5, atol=1e-6)
        assert derived[pk][1] == source_hash
    # The model ran twice, on the 8 sampled rows and on the probe texts: no row was embedded.
    assert minilm256.calls - calls_before == 2

    # verify: the derived vectors against the model's own truncated output.
    report = lifecycle.verify(TARGET, "v2", sample=24)
    assert report.passed and report.min_cosine > 0.999, report.problems
    # The query is transformed the same way: the 256-dimension alias's query vector is the
    # full model's, truncated and re-normalized.
    query = "interest rates and inflation at the central bank"
    q_full = encoders.load(get_config().model("minilm")).encode_query(query)
    q_256 = encoders.load(get_config().model("minilm256")).encode_query(query)
    np.testing.assert_allclose(unit(q_256), unit(q_full[:256]), rtol=1e-4, atol=1e-5)

    call_command("embeddings", "index", TARGET, "v2")
    call_command("embeddings", "activate", TARGET, "v2")
    hits = Article.embedding.search(query, k=10)
    assert {hit.embedding_version for hit in hits} == {"v2"}
    keys = list(derived)
    matrix = np.vstack([derived[pk][0] for pk in keys])
    exact = [keys[i] for i in np.argsort(-(matrix @ unit(q_256)), kind="stable")[:10]]
    assert [hit.pk for hit in hits] == exact


def test_derive_half_precision_keeps_the_vectors_within_halfvec_rounding(parent, capsys):
    call_command("embeddings", "derive", TARGET, "v2", "--from", "v1", "--storage", "halfvec",
                 "--inline")
    v2 = EmbeddingVersion.objects.get_version(TARGET, "v2")
    assert (v2.model_alias, v2.storage, v2.dimensions) == ("minilm_half", "halfvec", 384)
    full, half = parent.store.read_all(), v2.store.read_all()
    for pk, (vector, _) in full.items():
        np.testing.assert_allclose(half[pk][0], vector.astype(np.float16).astype(np.float32))
    assert lifecycle.verify(TARGET, "v2").passed


def test_a_derived_version_is_written_by_saves_like_any_other(parent):
    call_command("embeddings", "derive", TARGET, "v2", "--from", "v1", "--dimensions", "256",
                 "--inline")
    article = Article.objects.order_by("pk").first()
    article.title = "Rugby: a last-minute try wins the final"
    article.save()
    v1_vector = parent.store.read_vector(article.pk)
    v2 = EmbeddingVersion.objects.get_version(TARGET, "v2")
    np.testing.assert_allclose(v2.store.read_vector(article.pk), unit(v1_vector[:256]),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("args", "message"), [
    (["--storage", "bit"], "--storage bit (binary quantization with a re-rank by the parent) is "
     "not built yet; derive with --dimensions N or --storage halfvec."),
    ([], "Nothing to derive: give --dimensions N (fewer than news.Article.embedding@v1's 384) or "
     "--storage halfvec."),
    (["--dimensions", "384"], "--dimensions must be an integer from 1 to 383, not 384."),
    (["--dimensions", "128"], "No model alias computes news.Article.embedding@v1's vectors with "
     "{'truncate_dim': 128}: add one to EMBEDDINGS[\"MODELS\"] with the same \"model\" ("),
    (["--dimensions", "256", "--model", "tiny"], "Model alias tiny computes vector(32) vectors, "
     "not the vector(256) derived from news.Article.embedding@v1; name another alias with "
     "--model."),
])
def test_what_cannot_be_derived_is_refused_with_one_line_and_nothing_changes(
        parent, args, message):
    with pytest.raises(CommandError) as refused:
        call_command("embeddings", "derive", TARGET, "v2", "--from", "v1", *args, "--inline")
    assert str(refused.value).startswith(message)
    assert list(EmbeddingVersion.objects.filter(target=TARGET).values_list("version", flat=True)
                ) == ["v1"]
