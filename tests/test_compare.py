"""`compare` (issue 4, acceptance 4): shadow reads of the same queries against two versions."""

from __future__ import annotations

import math
import re

import pytest
from django.core.management import call_command

from embeddings_app import compare
from project.news.models import Article
from tests.conftest import TARGET

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("layout")]  # both layouts


def add_and_backfill(version: str, alias: str) -> None:
    call_command("embeddings", "add", TARGET, version, "--model", alias)
    call_command("embeddings", "backfill", TARGET, version, "--inline")


def metric(out: str, name: str) -> tuple[float, ...]:
    line = next(line for line in out.splitlines() if line.startswith(name + " "))
    return tuple(float(value) for value in line.split()[1:])


# A quality figure of the models, not of where vectors live: one layout (the side table) is enough.
@pytest.mark.parametrize("layout", ["table"], indirect=True)
def test_proxy_recall_ranks_minilm_clearly_above_a_random_model_on_bbc_articles(
        make_articles, capsys):
    make_articles(300)
    add_and_backfill("v1", "minilm")
    add_and_backfill("v2", "tiny")  # a random-initialised 2-layer BERT: deliberately poor
    capsys.readouterr()
    call_command("embeddings", "compare", TARGET, "v1", "v2", "--k", "10", "--sample", "100")
    out = capsys.readouterr().out
    print(out)
    assert "100 queries (proxy: a sentence out of a document, that document relevant)" in out
    minilm, tiny = metric(out, "recall@10")
    assert minilm >= 0.8 and minilm - tiny >= 0.3, out
    assert metric(out, "nDCG@10")[0] > metric(out, "nDCG@10")[1]
    (overlap,) = metric(out, "overlap@10")
    assert 0 <= overlap < 0.5


def test_proxy_queries_are_sentences_of_the_relevant_document(make_articles):
    make_articles(30)
    queries = compare.proxy_queries(TARGET, 20, seed=3)
    assert len(queries) == 20
    assert len({next(iter(q.relevant)) for q in queries}) == 20  # 20 distinct documents
    for query in queries:
        (key,) = query.relevant
        assert query.text in Article.objects.get(pk=int(key)).embedding.text
    assert [q.text for q in compare.proxy_queries(TARGET, 20, seed=3)] == [q.text for q in queries]


def test_relevance_file_gives_recall_and_ndcg_for_both_versions(make_articles, tmp_path, capsys):
    articles = make_articles(40)
    add_and_backfill("v1", "tiny")
    add_and_backfill("v2", "tiny_other")
    call_command("embeddings", "activate", TARGET, "v1", "--force")
    queries = {"oil prices rise": [articles[0].pk, articles[5].pk],
               "election results": [articles[9].pk],
               "a query with no judgement": []}
    lines = [f"{q}\t{pk}" for q, pks in queries.items() for pk in pks]
    lines.append("a query with no judgement")
    (tmp_path / "rel.tsv").write_text("# query<TAB>row key\n" + "\n".join(lines) + "\n")
    capsys.readouterr()
    call_command("embeddings", "compare", TARGET, "v1", "v2", "--queries",
                 str(tmp_path / "rel.tsv"), "--k", "5")
    out = capsys.readouterr().out
    assert "3 queries (" in out and "2 with known relevance, k=5" in out

    # The same figures, computed here from v1's own search results (v1 is active).
    recalls, ndcgs = [], []
    for query, relevant in queries.items():
        if not relevant:
            continue
        found = [obj.pk for obj in Article.embedding.search(query, k=5)]
        gains = [1.0 if pk in relevant else 0.0 for pk in found]
        recalls.append(sum(gains) / len(relevant))
        dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains))
        ndcgs.append(dcg / sum(1 / math.log2(i + 2) for i in range(len(relevant))))
    assert metric(out, "recall@5")[0] == pytest.approx(sum(recalls) / 2, abs=5e-4)
    assert metric(out, "nDCG@5")[0] == pytest.approx(sum(ndcgs) / 2, abs=5e-4)
    assert re.search(r"^overlap@5\s+\d\.\d{3}$", out, re.MULTILINE)


def test_scores_by_hand():
    assert compare._scores(["a", "x", "b"], {"a", "b"}, 3) == pytest.approx(
        (1.0, (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))))
    assert compare._scores(["x", "y"], {"a"}, 2) == (0.0, 0.0)
