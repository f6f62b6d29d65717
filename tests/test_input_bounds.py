"""Inputs are checked against their real bounds in the library (issue 12, build 2): the command,
the admin and the Python API refuse the same input with one clear line, and the database (version
records, history, runs, columns, every row) is exactly as before."""

from __future__ import annotations

import math

import numpy as np
import pytest
from django.test import Client

from embeddings_app import backfill, lifecycle, limits
from embeddings_app.exceptions import EmbeddingError
from embeddings_app.models import EmbeddingVersion
from project.news.models import Article, Ticket
from tests.conftest import TARGET
from tests.test_admin import OPERATOR_PERMS, login, make_user
from tests.test_refusals import assert_refused, database_state, with_v1  # noqa: F401

# v1 (tiny) backfilled, verified and active; v2 (tiny_other) added: 12 articles.
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("with_v1")]


def assert_api_refused(call, expected: str) -> None:
    """The Python API's refusal: an EmbeddingError of one line, nothing changed."""
    before = database_state()
    with pytest.raises(EmbeddingError) as excinfo:
        call()
    assert expected in str(excinfo.value), str(excinfo.value)
    assert "\n" not in str(excinfo.value)
    assert database_state() == before


HNSW_CASES = [
    (["--ef-search", "0"], "HNSW ef_search must be an integer from 1 to 1000, not 0."),
    (["--ef-search", "1001"], "HNSW ef_search must be an integer from 1 to 1000, not 1001."),
    (["--m", "1"], "HNSW m must be an integer from 2 to 100, not 1."),
    (["--m", "101"], "HNSW m must be an integer from 2 to 100, not 101."),
    (["--ef-construction", "1001"], "HNSW ef_construction must be an integer from 4 to 1000"),
    (["--m", "40"], "HNSW ef_construction (64) must be at least 2 * m (80)."),
    (["--ef-search", "100", "--m", "0"], "HNSW m must be an integer from 2 to 100, not 0."),
]


@pytest.mark.parametrize(("args", "expected"), HNSW_CASES)
def test_hnsw_parameters_outside_pgvectors_bounds_are_refused(args, expected):
    assert_refused(["index", TARGET, "v1", *args], expected)
    options = {"--ef-search": "ef_search", "--m": "m", "--ef-construction": "ef_construction"}
    kwargs = {options[args[i]]: int(args[i + 1]) for i in range(0, len(args), 2)}
    assert_api_refused(lambda: lifecycle.build_index(TARGET, "v1", **kwargs), expected)
    # A search still works: no unusable ef_search was stored.
    assert len(Article.embedding.search("the economy", k=3)) == 3


@pytest.mark.parametrize(("value", "expected"), [
    ("0", "The batch size must be an integer from 1 to 10000, not 0."),
    ("-5", "The batch size must be an integer from 1 to 10000, not -5."),
    (str(limits.MAX_BATCH_SIZE + 1), "The batch size must be an integer from 1 to 10000"),
])
def test_batch_sizes_outside_1_to_the_maximum_are_refused_and_zero_is_not_the_default(
        value, expected):
    assert_refused(["backfill", TARGET, "v2", "--inline", "--batch-size", value], expected)
    assert_refused(["backfill", TARGET, "v2", "--inline", "--batch-size", value],
                   f"not {int(value)}. [--batch-size]")  # the command adds its flag
    version = EmbeddingVersion.objects.get(target=TARGET, version="v2")
    assert_api_refused(lambda: backfill.start(version, batch_size=int(value)), expected)
    with pytest.raises(EmbeddingError) as refused:  # the library's line names no flag
        backfill.start(version, batch_size=int(value))
    assert "--" not in str(refused.value) and refused.value.option == "batch_size"


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-0.5", "1.5"])
def test_verify_thresholds_must_be_finite_cosines_in_0_to_1(value):
    expected = "The verify threshold must be a cosine similarity in (0, 1]"
    assert_refused(["verify", TARGET, "v1", "--threshold", value], expected)
    assert_api_refused(lambda: lifecycle.verify(TARGET, "v1", threshold=float(value)), expected)


@pytest.mark.parametrize(("args", "expected"), [
    (["verify", TARGET, "v1", "--sample", "0"],
     "The verify sample must be an integer from 1 to 100000, not 0. [--sample]"),
    (["compare", TARGET, "v1", "v1", "--k", "0"], "k must be an integer from 1 to 1000, not 0. [--k]"),
    (["compare", TARGET, "v1", "v1", "--k", "1001"], "k must be an integer from 1 to 1000, not 1001. [--k]"),
    (["compare", TARGET, "v1", "v1", "--sample", "0"],
     "The comparison sample must be an integer from 1 to 10000, not 0. [--sample]"),
])
def test_samples_and_k_outside_their_bounds_are_refused(args, expected):
    assert_refused(args, expected)


@pytest.mark.parametrize("k", [0, -1, limits.MAX_K + 1, 2.5, True])
def test_search_k_outside_1_to_the_documented_maximum_is_refused(k):
    expected = f"k must be an integer from 1 to {limits.MAX_K}, not {k!r}."
    assert_api_refused(lambda: Article.embedding.search("markets", k=k), expected)
    assert_api_refused(lambda: Article.embedding.search_vector(
        np.ones(32, dtype=np.float32), version="v1", k=k), expected)


def test_a_search_queryset_of_another_model_is_refused():
    expected = ("search(queryset=...) must be a queryset of news.Article, not of news.Ticket.")
    assert_api_refused(lambda: Article.embedding.search("markets", queryset=Ticket.objects.all()),
                       expected)
    assert_api_refused(lambda: Article.embedding.search_vector(
        np.ones(32, dtype=np.float32), version="v1", queryset=Ticket.objects.all()), expected)
    assert_api_refused(lambda: Article.embedding.search("markets", queryset=[1, 2]),
                       "must be a queryset of news.Article, not of list.")


@pytest.mark.parametrize(("vector", "expected"), [
    (np.zeros(32), "The query vector is all zeros"),
    (np.full(32, math.nan), "The query vector has NaN or infinite values."),
    (np.full(32, math.inf), "The query vector has NaN or infinite values."),
    (np.ones(31), "The vector has shape (31,) but version \"v1\" stores 32 dimensions."),
    (np.ones((2, 32)), "The vector has shape (2, 32)"),
    (["a"] * 32, "The query vector is not a vector of numbers"),
])
def test_query_vectors_must_be_finite_non_zero_and_of_the_versions_dimension(vector,
                                                                             expected):
    assert_api_refused(lambda: Article.embedding.search_vector(vector, version="v1"), expected)


@pytest.mark.parametrize("path", ["abc", "1x", "-1", "99999"])
def test_malformed_admin_urls_are_not_found_and_change_nothing(path):
    client: Client = login(make_user("operator", staff=True, codenames=OPERATOR_PERMS))
    before = database_state()
    for step in ("activate", "drop", "nosuchstep"):
        url = f"/admin/embeddings_app/embeddingversion/{path}/lifecycle/{step}/"
        assert client.post(url, {"confirm": "yes"}).status_code == 404, url
    v1 = EmbeddingVersion.objects.get(target=TARGET, version="v1")
    url = f"/admin/embeddings_app/embeddingversion/{v1.pk}/lifecycle/nosuchstep/"
    assert client.post(url, {"confirm": "yes"}).status_code == 404
    assert database_state() == before
