"""`embeddings derive`: a version computed from another's vectors without running the model over
the table (truncated and re-normalized, half precision, or binary-quantized), on the real MiniLM:
the derived vectors, their agreement with the model's own truncated or quantized output (verify),
searches against brute force with the query transformed the same way (a bit version: its Hamming
candidates re-ranked by the parent's exact distance), the lineage in `status`, the parent kept
while a bit child needs it, a bit child activated only once its parent is complete, and the
refusals (one line; a flag only through the command)."""

from __future__ import annotations

import numpy as np
import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from embeddings_app import backfill, derive, encoders, lifecycle, stores
from embeddings_app.config import get_config
from embeddings_app.exceptions import Refused
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
    (["--storage", "bit", "--dimensions", "256"], "A bit version keeps its parent's dimensions "
     "(its candidates are re-ranked by the parent's vectors): derive the bits without "
     "dimensions, or from a version of that many dimensions. [--dimensions]"),
    ([], "Nothing to derive: give the dimensions to keep (fewer than "
     "news.Article.embedding@v1's 384) or a storage (halfvec or bit). [--dimensions]"),
    (["--dimensions", "384"], "The derived dimensions must be an integer from 1 to 383, not 384. "
     "[--dimensions]"),
    (["--dimensions", "128"], "No model alias computes news.Article.embedding@v1's vectors with "
     "{'truncate_dim': 128}: add one to EMBEDDINGS[\"MODELS\"] with the same \"model\" ("),
    (["--dimensions", "256", "--model", "tiny"], "Model alias tiny computes vector(32) vectors, "
     "not the vector(256) derived from news.Article.embedding@v1; name another alias. [--model]"),
])
def test_what_cannot_be_derived_is_refused_with_one_line_and_nothing_changes(
        parent, args, message):
    with pytest.raises(CommandError) as refused:
        call_command("embeddings", "derive", TARGET, "v2", "--from", "v1", *args, "--inline")
    assert str(refused.value).startswith(message)
    assert list(EmbeddingVersion.objects.filter(target=TARGET).values_list("version", flat=True)
                ) == ["v1"]


def test_a_bad_dimension_names_its_flag_through_the_command_and_none_through_the_api(db):
    call_command("embeddings", "add", TARGET, "v1", "--model", "minilm")  # no rows needed
    with pytest.raises(CommandError) as command:
        call_command("embeddings", "derive", TARGET, "v2", "--from", "v1", "--dimensions", "0")
    assert str(command.value) == ("The derived dimensions must be an integer from 1 to 383, "
                                  "not 0. [--dimensions]")
    with pytest.raises(Refused) as api:
        derive.derive(TARGET, "v2", "v1", dimensions=0)
    assert api.value.option == "dimensions"
    assert str(api.value) == "The derived dimensions must be an integer from 1 to 383, not 0."
    assert "--" not in str(api.value)


def hamming(bits: np.ndarray, query_bits: np.ndarray) -> np.ndarray:
    """Hamming distances of +1/-1 sign rows to one sign vector."""
    return (bits != query_bits).sum(axis=1)


def test_bit_versions_in_both_layouts_search_their_hamming_index_and_rerank_by_the_parent(
        parent, capsys, settings):
    # 5 x k candidates: for k = 1 and 2, 5 and 10 of the 24 rows, so the candidate set matters.
    settings.EMBEDDINGS = {**settings.EMBEDDINGS, "RERANK_OVERSAMPLING": 5}
    full = parent.store.read_all()
    keys = list(full)
    matrix = np.vstack([full[pk][0] for pk in keys])
    minilm = encoders.load(get_config().model("minilm"))
    children = []
    for name, child_layout in (("v3", "column"), ("v4", "table")):
        call_command("embeddings", "derive", TARGET, name, "--from", "v1", "--storage", "bit",
                     "--layout", child_layout, "--sample", "4", "--inline")
        child = EmbeddingVersion.objects.get_version(TARGET, name)
        children.append(child)
        assert (child.storage, child.dimensions, child.layout, child.model_alias,
                child.state) == ("bit", 384, child_layout, "minilm", State.READY)
        assert (child.derived_from, child.derivation, child.lineage) == (
            parent, "bit", f"{name} <- v1 (bit)")
        # binary_quantize in SQL: a bit is set exactly where the parent's element is > 0.
        bits = child.store.read_all()
        for pk, (vector, source_hash) in full.items():
            np.testing.assert_array_equal(bits[pk][0], np.where(vector > 0, 1.0, -1.0))
            assert bits[pk][1] == source_hash
        assert lifecycle.verify(TARGET, name, sample=8).passed  # the model's quantized output
        capsys.readouterr()
        call_command("embeddings", "index", TARGET, name)
        assert f"USING hnsw ({child.column} bit_hamming_ops)" in _index_definition(child)
        call_command("embeddings", "status", TARGET)
        status = capsys.readouterr().out
        assert f"{name} <- v1 (bit)" in status and " 384 bit " in status
        call_command("embeddings", "activate", TARGET, name)

        signs = np.vstack([bits[pk][0] for pk in keys])
        recalls = []
        for query in ["interest rates and inflation at the central bank",
                      "a cup final in football", "elections and the prime minister",
                      "a new mobile phone and broadband"]:
            q = minilm.encode_query(query)
            exact_distance = 1 - (matrix @ q) / np.linalg.norm(matrix, axis=1) / np.linalg.norm(q)
            for k in (1, 2):
                hits = Article.embedding.search(query, k=k)
                assert len(hits) == k and {hit.embedding_version for hit in hits} == {name}
                found = [keys.index(hit.pk) for hit in hits]
                # The candidates: the 5 x k rows nearest by Hamming distance (rows tied with
                # the last one may or may not be among them).
                distance = hamming(signs, stores.binary_signs(q))
                boundary = np.sort(distance)[get_config().rerank_oversampling * k - 1]
                surely, possibly = distance < boundary, distance <= boundary
                assert all(possibly[i] for i in found)
                # Re-ranked by the parent's exact distance: ordered, and no sure candidate
                # nearer than the last hit is left out.
                np.testing.assert_allclose([hit.distance for hit in hits],
                                           exact_distance[found], atol=1e-5)
                assert [hit.distance for hit in hits] == sorted(hit.distance for hit in hits)
                assert not [i for i in np.flatnonzero(surely) if i not in found
                            and exact_distance[i] < hits[-1].distance - 1e-6]
                brute = set(np.argsort(exact_distance, kind="stable")[:k])
                recalls.append(len(brute & set(found)) / k)
        # Recall@k against brute force on the parent.
        assert np.mean(recalls) >= 0.75, recalls
        # A filtered search returns k rows of the filter (the Hamming scan is iterative).
        half = Article.objects.filter(pk__in=keys[::2])
        hits = Article.embedding.search("a cup final in football", k=3, queryset=half)
        assert len(hits) == 3 and {hit.pk for hit in hits} <= set(keys[::2])
    # A save writes the bits of the model's new vector (quantized in SQL), like the parent's.
    article = Article.objects.get(pk=keys[0])
    article.title = "Rugby: a last-minute try wins the final"
    article.save()
    for child in children:
        np.testing.assert_array_equal(child.store.read_vector(article.pk),
                                      stores.binary_signs(parent.store.read_vector(article.pk)))


def _index_definition(version: EmbeddingVersion) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s",
                       [version.store.index_name()])
        return cursor.fetchone()[0]


@pytest.fixture
def small_parent(make_articles):
    """v1: MiniLM over 3 real articles, backfilled (what a lifecycle test needs)."""
    make_articles(3)
    call_command("embeddings", "add", TARGET, "v1", "--model", "minilm")
    call_command("embeddings", "backfill", TARGET, "v1", "--inline")
    return EmbeddingVersion.objects.get_version(TARGET, "v1")


def test_the_parent_of_a_bit_version_is_kept_until_the_child_is_dropped(small_parent, capsys):
    parent = small_parent
    call_command("embeddings", "derive", TARGET, "v3", "--from", "v1", "--storage", "bit",
                 "--sample", "2", "--inline")
    capsys.readouterr()
    call_command("embeddings", "retire", TARGET, "v1")
    assert ("Warning: news.Article.embedding@v3 (ready) re-ranks its search candidates by "
            "news.Article.embedding@v1's vectors, which are no longer written now"
            in capsys.readouterr().out)
    with pytest.raises(CommandError) as refused:
        call_command("embeddings", "drop", TARGET, "v1", "--yes")
    assert str(refused.value) == (
        "news.Article.embedding@v3 (ready) re-ranks its search candidates by "
        "news.Article.embedding@v1's vectors: retire and drop news.Article.embedding@v3 first "
        "(`manage.py embeddings retire news.Article.embedding v3`, then `drop`), then drop v1.")
    assert EmbeddingVersion.objects.get_version(TARGET, "v1").state == State.RETIRED
    assert parent.store.exists()
    call_command("embeddings", "retire", TARGET, "v3")
    call_command("embeddings", "drop", TARGET, "v3", "--yes")
    call_command("embeddings", "drop", TARGET, "v1", "--yes")
    assert EmbeddingVersion.objects.get_version(TARGET, "v1").state == State.DROPPED


def test_a_bit_version_is_activated_only_once_its_parent_is_backfilled(make_articles):
    # v1's backfill runs one of its three batches: v1 is backfilling, with one vector of three.
    make_articles(3)
    call_command("embeddings", "add", TARGET, "v1", "--model", "minilm")
    run, ranges = backfill.start(EmbeddingVersion.objects.get_version(TARGET, "v1"),
                                 batch_size=1, mode="inline")
    backfill.run_batch(run.pk, 0)
    # The bits of v3 are derived from v1's one vector, the other two embedded by v3's backfill.
    call_command("embeddings", "derive", TARGET, "v3", "--from", "v1", "--storage", "bit",
                 "--sample", "1", "--inline")
    assert lifecycle.readiness(EmbeddingVersion.objects.get_version(TARGET, "v3")).problems == []
    assert lifecycle.verify(TARGET, "v3").passed
    call_command("embeddings", "index", TARGET, "v3")
    with pytest.raises(CommandError) as refused:
        call_command("embeddings", "activate", TARGET, "v3")
    assert str(refused.value) == (
        "news.Article.embedding@v3 re-ranks its candidates by news.Article.embedding@v1, which "
        "is backfilling (rows without its vector would drop out of the results); finish its "
        "backfill (`manage.py embeddings backfill news.Article.embedding v1`) first.")
    assert EmbeddingVersion.objects.get_version(TARGET, "v3").state == State.READY
    for number in range(1, len(ranges)):  # the rest of v1's backfill; the last batch ends it
        backfill.run_batch(run.pk, number)
    assert EmbeddingVersion.objects.get_version(TARGET, "v1").state == State.READY
    call_command("embeddings", "activate", TARGET, "v3")
    assert EmbeddingVersion.objects.get_version(TARGET, "v3").state == State.ACTIVE
    hits = Article.embedding.search("a cup final in football", k=3)
    assert len(hits) == 3 and {hit.embedding_version for hit in hits} == {"v3"}


def test_the_rerank_oversampling_setting_is_validated_with_a_check_id():
    from django.conf import settings

    from embeddings_app import config

    def problems(value: object) -> list[tuple[str, str]]:
        return [(p.id, p.message)
                for p in config.validate({**settings.EMBEDDINGS, "RERANK_OVERSAMPLING": value})]

    assert problems(40) == []
    assert problems(0) == [("embeddings.E052", 'EMBEDDINGS["RERANK_OVERSAMPLING"] must be an '
                            "integer from 1 to 1000, not 0.")]
    assert problems(2.5)[0][0] == problems(True)[0][0] == problems(1001)[0][0] == "embeddings.E052"
