"""`backfill --estimate`, `migrate --estimate` and the admin's backfill confirmation: rows, tokens,
requests, time at the limits and cost, without a single request to the model."""

from __future__ import annotations

import pytest
from django.conf import settings
from django.core.management import call_command
from django.urls import reverse

from embeddings_app import registry
from embeddings_app.models import EmbeddingVersion
from project.news.models import Article
from tests.conftest import TARGET
from tests.embedding_servers import bound_tokens

pytestmark = pytest.mark.django_db


def make_rows(count: int) -> list[Article]:
    rows = [Article(title=f"Title {i}", body=f"Body of article {i}: prices, goals and films.")
            for i in range(count)]
    rows.append(Article(title="", body=""))  # empty source: nothing to embed
    return Article.objects.bulk_create(rows)


def test_backfill_estimate_counts_what_is_left_and_sends_nothing(fault_server, capsys):
    articles = make_rows(10)
    call_command("embeddings", "add", TARGET, "v1", "--model", "api_limited")
    sent = len(fault_server.requests)
    field = registry.get(TARGET)
    texts = [field.source_text(a) for a in articles if field.source_text(a)]
    tokens = sum(bound_tokens(t) for t in texts)

    call_command("embeddings", "backfill", TARGET, "v1", "--estimate")
    out = capsys.readouterr().out
    assert len(fault_server.requests) == sent  # the API was not called
    assert "rows to embed  10" in out
    assert f"tokens         {tokens} (an upper bound" in out
    assert "requests       5" in out  # max_batch_inputs 2
    seconds = 60 * max(tokens / 12000, 5 / 120)  # tokens_per_minute, requests_per_minute
    assert f"time           {seconds:.0f}s at the configured" in out
    assert f"cost           {tokens / 1e6 * 0.02:.4f}" in out
    version = EmbeddingVersion.objects.get(target=TARGET, version="v1")
    assert not version.runs.exists() and version.state == "new"

    call_command("embeddings", "backfill", TARGET, "v1", "--inline")
    Article.objects.filter(pk=articles[0].pk).update(body="changed without a save signal")
    call_command("embeddings", "backfill", TARGET, "v1", "--estimate")
    assert "rows to embed  1" in capsys.readouterr().out  # only the stale row is left


def test_migrate_estimate_counts_exact_tokens_with_the_models_tokenizer(capsys):
    """api_minilm points at no running server here: the estimate never needs one."""
    from transformers import AutoTokenizer

    articles = make_rows(6)
    call_command("embeddings", "migrate", TARGET, "--to", "api_minilm", "--estimate")
    out = capsys.readouterr().out
    field = registry.get(TARGET)
    texts = [field.source_text(a) for a in articles if field.source_text(a)]
    tokenizer = AutoTokenizer.from_pretrained(settings.EMBEDDINGS["MODELS"]["minilm"]["model"],
                                              local_files_only=True)
    tokens = sum(len(ids) for ids in tokenizer(texts)["input_ids"])
    assert "rows to embed  6" in out
    assert f"tokens         {tokens} (exact, with the model's tokenizer)" in out
    assert "time           - (no tokens_per_minute" in out and "cost           - (no price" in out
    assert not EmbeddingVersion.objects.exists()  # nothing added


def test_the_admin_confirms_an_api_backfill_with_its_estimate(fault_server, admin_client):
    make_rows(4)
    call_command("embeddings", "add", TARGET, "v1", "--model", "api_limited")
    version = EmbeddingVersion.objects.get(target=TARGET, version="v1")
    url = reverse("admin:embeddings_app_embeddingversion_lifecycle", args=[version.pk, "backfill"])
    sent = len(fault_server.requests)
    page = admin_client.post(url).content.decode()  # without confirm=yes: the confirmation
    assert "rows to embed  4" in page and "requests       2" in page and "cost" in page
    assert not version.runs.exists() and len(fault_server.requests) == sent
    change = admin_client.get(reverse("admin:embeddings_app_embeddingversion_change",
                                      args=[version.pk])).content.decode()
    assert f'href="{url}"' in change  # the button leads to the confirmation page
