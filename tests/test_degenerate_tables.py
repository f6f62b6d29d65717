"""Degenerate tables (issue 12, build 2: "degenerate tables" input class): a table with no rows,
and a table whose every row has an empty source, go through the whole lifecycle with clear
results and no traceback. Nothing is embedded, nothing fails, verify passes (there is nothing to
compare and that is not drift), searches return nothing, and the steps that need rows refuse with
one line and change nothing. Rows that do have text but no vector still fail verify."""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from embeddings_app import lifecycle
from embeddings_app.models import EmbeddingVersion, State
from project.news.models import Article
from tests.conftest import TARGET
from tests.store_helpers import forget
from tests.test_admin import LIST_URL, OPERATOR_PERMS, admin_messages, change_url, login, make_user, step_url
from tests.test_refusals import assert_refused

# CREATE INDEX CONCURRENTLY (index, migrate) needs autocommit: a transactional test.
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("layout")]


def verdict(out: str) -> str:
    """verify's one-line verdict: the last line it prints, after its table."""
    return out.strip().splitlines()[-1]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    call_command("embeddings", *args)
    return capsys.readouterr().out


@pytest.fixture(params=["no rows", "only empty sources"])
def degenerate(request: pytest.FixtureRequest) -> int:
    """The table's row count after filling it the degenerate way."""
    if request.param == "only empty sources":
        Article.objects.bulk_create([Article(title="", body=""), Article(title="   ", body=""),
                                     Article(title="", body="\n\t ")])
    return Article.objects.count()


def test_the_whole_lifecycle_runs_on_a_degenerate_table_with_clear_results(degenerate, capsys):
    rows = degenerate
    out = run(capsys, "add", TARGET, "v1", "--model", "tiny")
    assert "v1" in out

    out = run(capsys, "backfill", TARGET, "v1", "--inline")
    assert f"0 embedded, {rows} empty" in out, out
    assert "failed" not in out.replace("0 failed", "")

    run(capsys, "index", TARGET, "v1")
    out = run(capsys, "verify", TARGET, "v1")
    assert verdict(out) == (f"verify PASSED for {TARGET}@v1: no stored vector to compare (no row "
                            f"has source text), fingerprint ok, {rows}/{rows} rows covered, 0 stale.")
    report = lifecycle.verify(TARGET, "v1")
    assert report.passed and report.compared == 0 and report.min_cosine is None
    # The admin: its pages render and its verify step shows the command's verdict.
    client = login(make_user("operator", staff=True, codenames=OPERATOR_PERMS))
    v1 = EmbeddingVersion.objects.get_version(TARGET, "v1")
    assert client.get(LIST_URL).status_code == 200
    assert client.get(change_url(v1)).status_code == 200
    assert admin_messages(client, client.post(step_url(v1, "verify"))) == [verdict(out)]

    run(capsys, "activate", TARGET, "v1")
    assert EmbeddingVersion.objects.active_for(TARGET).version == "v1"
    status = run(capsys, "status", TARGET)
    assert "v1" in status and "active" in status

    assert Article.embedding.search("the economy", k=5) == []
    assert list(Article.embedding.search("the economy", k=5,
                                         queryset=Article.objects.filter(category="x"))) == []

    # compare needs rows to draw queries from: one line, nothing changed.
    run(capsys, "add", TARGET, "v2", "--model", "tiny_other")
    run(capsys, "backfill", TARGET, "v2", "--inline")
    assert_refused(["compare", TARGET, "v1", "v2"], "has no rows to draw proxy queries from")
    run(capsys, "retire", TARGET, "v2")
    run(capsys, "drop", TARGET, "v2", "--yes")

    # The model change end to end, then the probes, rollback, retire and drop of the old one.
    out = run(capsys, "migrate", TARGET, "--to", "tiny_other", "--version", "v3", "--inline")
    assert EmbeddingVersion.objects.active_for(TARGET).version == "v3", out
    assert "probes match" in run(capsys, "probe", TARGET)
    run(capsys, "rollback", TARGET)
    assert EmbeddingVersion.objects.active_for(TARGET).version == "v1"
    run(capsys, "activate", TARGET, "v3")
    run(capsys, "retire", TARGET, "v1")
    run(capsys, "drop", TARGET, "v1", "--yes")
    assert EmbeddingVersion.objects.get_version(TARGET, "v1").state == State.DROPPED
    assert Article.embedding.search("the economy", k=5) == []


def test_a_saved_row_with_text_on_a_table_that_was_empty_is_embedded_and_found(capsys):
    run(capsys, "add", TARGET, "v1", "--model", "tiny")
    run(capsys, "backfill", TARGET, "v1", "--inline")
    run(capsys, "activate", TARGET, "v1", "--force")
    article = Article.objects.create(title="Central bank raises rates", body="Inflation is high.")
    assert [hit.pk for hit in Article.embedding.search("interest rates", k=5)] == [article.pk]
    assert verdict(run(capsys, "verify", TARGET, "v1")).startswith(
        f"verify PASSED for {TARGET}@v1: 1 sampled vectors match")


def test_verify_still_fails_when_a_row_with_text_has_no_vector(capsys):
    Article.objects.bulk_create([Article(title="", body=""),
                                 Article(title="Storm closes the harbour", body="")])
    run(capsys, "add", TARGET, "v1", "--model", "tiny")
    run(capsys, "backfill", TARGET, "v1", "--inline")
    assert verdict(run(capsys, "verify", TARGET, "v1")).startswith(
        f"verify PASSED for {TARGET}@v1: 1 sampled vectors match")

    forget(EmbeddingVersion.objects.get_version(TARGET, "v1"),
           [Article.objects.get(title="Storm closes the harbour").pk])
    with pytest.raises(CommandError) as failure:
        call_command("embeddings", "verify", TARGET, "v1")
    message = str(failure.value)
    assert message.startswith(f"verify FAILED for {TARGET}@v1: coverage: 1 of 2 rows have no vector")
    assert "no stored vectors to compare: 1 of 2 sampled rows have source text but no vector" in message
