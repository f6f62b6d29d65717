"""Truncation made visible (issue 17, item 1): add, status, verify, compare and the admin report
how many rows exceed the model's token limit and by how much, counted with the model's own
tokenizer, on a stated sample of a big table; status only reads the stored figure.

Every count is checked against an independent one made here: the model folder's
``tokenizer.json`` read with the ``tokenizers`` library (not the loaded model's tokenizer object),
special tokens included, against the limit the model was built with."""

from __future__ import annotations

import dataclasses
import html
import re
import statistics
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from tokenizers import Tokenizer

from embeddings_app import encoders, truncation
from embeddings_app.config import get_config, parse, validate
from embeddings_app.models import EmbeddingVersion
from project.news.models import Article
from tests.conftest import TARGET

TINY_LIMIT = 256  # tests/tinymodel.py builds the tiny models with max_seq_length=256
SHORT_LIMIT = 32  # the alias "tiny32" below: the same model cut at 32 tokens


def independent_counts(folder: str | Path, texts: list[str]) -> list[int]:
    tokenizer = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return [len(encoding.ids) for encoding in tokenizer.encode_batch(texts)]


def tiny_folder() -> str:
    return django_settings.EMBEDDINGS["MODELS"]["tiny"]["model"]


def texts_of(keys: list[str] | None = None) -> dict[str, str]:
    rows = Article.objects.all() if keys is None else Article.objects.filter(pk__in=keys)
    return {str(a.pk): a.embedding.text for a in rows if a.embedding.text.strip()}


def expected(texts: list[str], limit: int) -> tuple[int, float | None, int | None]:
    """(rows over the limit, median overflow, max overflow), counted independently."""
    overflows = [n - limit for n in independent_counts(tiny_folder(), texts) if n > limit]
    if not overflows:
        return 0, None, None
    return len(overflows), float(statistics.median(overflows)), max(overflows)


@pytest.fixture
def short_alias(settings: object) -> str:
    """"tiny32": the tiny model with max_seq_length 32 (a model change that shortens the limit)."""
    models = dict(settings.EMBEDDINGS["MODELS"])  # type: ignore[attr-defined]
    models["tiny32"] = {**models["tiny"], "revision": "tiny-seed-0-32",
                        "max_seq_length": SHORT_LIMIT}
    settings.EMBEDDINGS = {**settings.EMBEDDINGS, "MODELS": models}  # type: ignore[attr-defined]
    return "tiny32"


@pytest.fixture
def mixed_articles(make_articles):
    """Real articles (most longer than 256 tokens), two short rows and one with empty text."""
    make_articles(8)
    Article.objects.create(title="Short", body="A short note about the markets.")
    Article.objects.create(title="Brief", body="Rain is expected in the north.")
    Article.objects.create(title="", body="")


@pytest.mark.django_db
def test_add_counts_every_row_over_the_limit_as_an_independent_tokenizer_does(
        mixed_articles, capsys):
    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny")
    out = capsys.readouterr().out
    figure = truncation.stored(EmbeddingVersion.objects.get_version(TARGET, "v1"))
    texts = list(texts_of().values())
    over, median, maximum = expected(texts, TINY_LIMIT)
    assert 0 < over < len(texts)  # the table mixes rows over and under the limit
    assert (figure.limit, figure.rows, figure.sampled, figure.counted) == (TINY_LIMIT, 11, 11, 10)
    assert (figure.over, figure.median_overflow, figure.max_overflow) == (over, median, maximum)
    assert figure.by == "add"
    line = (f"truncation {TARGET}@v1: {over} of 10 rows exceed 256 tokens "
            f"({100 * over / 10:.1f}%), median overflow {median:.0f} tokens (max {maximum}); "
            "all 11 rows counted (1 with empty text, not embedded) (measured by add ")
    assert line in out, out

    # The limit is the model's real one: a row over it embeds the same whatever follows its
    # first 256 tokens; a row under it does not.
    encoder = encoders.load(get_config().model("tiny"))
    long_text = max(texts, key=len)
    short_text = "A short note about the markets."
    vectors = encoder.encode_documents([long_text, long_text + " Unrelated words appended.",
                                        short_text, short_text + " Unrelated words appended."])
    assert abs(vectors[0] - vectors[1]).max() < 1e-6
    assert abs(vectors[2] - vectors[3]).max() > 1e-3


@pytest.mark.django_db
def test_a_table_larger_than_the_sample_is_counted_on_a_stated_random_sample_and_status_only_reads_it(
        make_articles, settings, monkeypatch, capsys):
    settings.EMBEDDINGS = {**settings.EMBEDDINGS, "TRUNCATION_SAMPLE": 10}
    make_articles(25)
    spec = get_config().model("tiny")
    figure = truncation.measure(TARGET, spec, encoders.load(spec), by="test")
    all_keys = {str(pk) for pk in Article.objects.values_list("pk", flat=True)}
    assert (figure.rows, figure.sampled, figure.counted) == (25, 10, 10)
    assert len(set(figure.keys)) == 10 and set(figure.keys) <= all_keys
    texts = texts_of(figure.keys)
    assert figure.tokens == independent_counts(tiny_folder(), [texts[k] for k in figure.keys])
    over, median, maximum = expected(list(texts.values()), TINY_LIMIT)
    assert (figure.over, figure.median_overflow, figure.max_overflow) == (over, median, maximum)
    assert figure.summary().endswith("; 10 of 25 rows sampled")
    assert figure.summary().startswith(f"{over} of 10 rows exceed 256 tokens")

    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny")
    stored = truncation.stored(EmbeddingVersion.objects.get_version(TARGET, "v1"))
    capsys.readouterr()

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("status tokenized or loaded a model")

    monkeypatch.setattr(truncation, "measure", no_tokenizing)
    monkeypatch.setattr(encoders, "load", no_tokenizing)
    call_command("embeddings", "status", TARGET)
    out = capsys.readouterr().out
    header, row = out.splitlines()[:2]
    assert "truncated" in header.split()
    assert f"{stored.percent:.1f}% >256" in row
    assert re.search(rf"^truncation {re.escape(TARGET)}@v1: {stored.over} of 10 rows exceed 256 "
                     r"tokens .*; 10 of 25 rows sampled \(measured by add \d{4}-\d\d-\d\d "
                     r"\d\d:\d\d UTC\)$", out, re.MULTILINE), out


@pytest.mark.django_db
def test_verify_prints_and_records_the_count_without_failing_on_it(mixed_articles, capsys):
    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny")
    call_command("embeddings", "backfill", TARGET, "v1", "--inline")
    capsys.readouterr()
    call_command("embeddings", "verify", TARGET, "v1")
    out = capsys.readouterr().out
    over, median, maximum = expected(list(texts_of().values()), TINY_LIMIT)
    assert over and "verify PASSED" in out  # rows over the limit are shown, not drift
    assert (f"  truncation    {over} of 10 rows exceed 256 tokens ({10 * over:.1f}%), median "
            f"overflow {median:.0f} tokens (max {maximum}); all 11 rows counted") in out, out
    version = EmbeddingVersion.objects.get_version(TARGET, "v1")
    assert version.truncation["by"] == "verify" and version.truncation["over"] == over
    assert version.verify_report["truncation"]["over"] == over


@pytest.mark.django_db
def test_compare_shows_each_versions_truncation_beside_recall_on_the_same_rows(
        make_articles, short_alias, capsys):
    make_articles(30)
    for version, alias in (("v1", "tiny"), ("v2", short_alias)):
        call_command("embeddings", "add", TARGET, version, "--model", alias)
        call_command("embeddings", "backfill", TARGET, version, "--inline")
    capsys.readouterr()
    call_command("embeddings", "compare", TARGET, "v1", "v2", "--k", "5", "--sample", "30")
    out = capsys.readouterr().out
    print(out)
    texts = list(texts_of().values())
    over_256, median_256, _ = expected(texts, TINY_LIMIT)
    over_32, median_32, _ = expected(texts, SHORT_LIMIT)
    assert over_32 == 30 and over_256 < 30
    row = next(line for line in out.splitlines() if line.startswith("truncated "))
    assert row.split()[1:] == [f"{100 * over_256 / 30:.1f}%", ">256", "100.0%", ">32"]
    assert (f"truncation v1: {over_256} of 30 rows exceed 256 tokens "
            f"({100 * over_256 / 30:.1f}%), median overflow {median_256:.0f} tokens") in out
    assert (f"truncation v2: 30 of 30 rows exceed 32 tokens (100.0%), median overflow "
            f"{median_32:.0f} tokens") in out
    recall_line = next(line for line in out.splitlines() if line.startswith("recall@5"))
    recall = dict(zip(("v1", "v2"), map(float, recall_line.split()[1:]), strict=True))
    # Proxy queries come from anywhere in an article: the model reading 32 tokens finds fewer.
    assert recall["v2"] < recall["v1"], out
    assert re.search(r"^note: v2 scores lower recall@5 and cuts more rows: 100% of its rows "
                     r"exceed 32 tokens against \d+% at 256 for v1\. .*truncation", out,
                     re.MULTILINE), out
    for name, over in (("v1", over_256), ("v2", over_32)):
        stored = EmbeddingVersion.objects.get_version(TARGET, name).truncation
        assert (stored["by"], stored["over"], stored["sampled"]) == ("compare", over, 30)


def test_the_note_appears_only_when_the_lower_recall_cuts_clearly_more_rows():
    def figure(over: int, limit: int) -> truncation.Truncation:
        return truncation.Truncation(limit=limit, rows=100, sampled=100, counted=100, over=over)

    assert truncation.explain("v1", figure(10, 256), "v2", figure(41, 128), 0.86, 0.82, 10)
    assert "v1 scores lower" in truncation.explain("v1", figure(41, 128), "v2", figure(10, 256),
                                                   0.5, 0.9, 10)
    assert not truncation.explain("v1", figure(10, 256), "v2", figure(13, 128), 0.86, 0.82, 10)
    assert not truncation.explain("v1", figure(41, 128), "v2", figure(10, 256), 0.9, 0.5, 10)
    unknown = truncation.Truncation(unknown="no tokenizer")
    assert not truncation.explain("v1", figure(10, 256), "v2", unknown, 0.86, 0.82, 10)


def test_an_api_alias_is_counted_only_with_a_declared_limit_and_a_local_tokenizer():
    """No request is made: the limit is the alias's max_input_tokens, the tokenizer a local
    model folder's tokenizer.json (api.TokenCounter); anything less is "unknown", with why."""
    config = get_config()
    served = config.model("api_minilm")  # a local folder served by infinity
    found = truncation.counter_for(served, None)
    assert isinstance(found, str) and "declares no max_input_tokens" in found
    limit, count, _ = truncation.counter_for(dataclasses.replace(served, max_input_tokens=16),
                                             None)
    texts = ["one two three", "a longer sentence " * 20]
    assert limit == 16 and count(texts) == independent_counts(served.model, texts)
    hosted = dataclasses.replace(config.model("api_fault"), max_input_tokens=8191)
    found = truncation.counter_for(hosted, None)
    assert isinstance(found, str) and found.startswith('no tokenizer for "fault-embed-1"')
    assert truncation.Truncation(unknown=found).cell() == "unknown"
    assert truncation.Truncation(unknown=found).summary() == f"token limit unknown: {found}"


@pytest.mark.django_db
def test_the_admin_lists_and_details_each_versions_last_figure(mixed_articles):
    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny")
    version = EmbeddingVersion.objects.get_version(TARGET, "v1")
    figure = truncation.stored(version)
    User.objects.create_superuser("admin", password="pw")
    client = Client()
    assert client.login(username="admin", password="pw")
    listing = client.get(reverse("admin:embeddings_app_embeddingversion_changelist"))
    page = listing.content.decode()
    assert listing.status_code == 200 and 'class="column-truncated' in page
    cell = re.search(r'<td class="field-truncated"><span class="ev-nowrap" title="([^"]*)">'
                     r"([^<]*)</span>", page)
    over, _, _ = expected(list(texts_of().values()), TINY_LIMIT)
    assert cell and cell.group(2) == html.escape(f"{10 * over:.1f}% >256"), page
    assert cell.group(1).startswith(html.escape(figure.summary()))
    detail = client.get(reverse("admin:embeddings_app_embeddingversion_change",
                                args=[version.pk])).content.decode()
    row = re.search(r'<td id="ev-truncation">([^<]*)</td>', detail)
    assert row and row.group(1).startswith(html.escape(figure.summary())), detail
    assert "(measured by add " in row.group(1)


@pytest.mark.parametrize("value", [0, -5, 100_001, "1000", True, 2.5])
def test_a_bad_truncation_sample_is_reported_by_the_system_checks(value):
    found = [p for p in validate({**django_settings.EMBEDDINGS, "TRUNCATION_SAMPLE": value})
             if p.id == "embeddings.E070"]
    assert len(found) == 1 and f"not {value!r}" in found[0].message, found
    assert "e.g. 1000" in found[0].hint


def test_a_valid_truncation_sample_passes_the_checks_and_is_the_configured_sample():
    raw = {**django_settings.EMBEDDINGS, "TRUNCATION_SAMPLE": 100_000}
    assert not [p for p in validate(raw) if p.id == "embeddings.E070"]
    assert parse(raw).truncation_sample == 100_000
    assert parse({**raw, "TRUNCATION_SAMPLE": 1000}).truncation_sample == 1000
    defaults = {key: value for key, value in raw.items() if key != "TRUNCATION_SAMPLE"}
    assert parse(defaults).truncation_sample == 1000
