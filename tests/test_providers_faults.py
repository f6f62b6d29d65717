"""An embedding API that fails: a real HTTP fault server on 127.0.0.1 (tests/embedding_servers.py),
reached through the openai SDK. Counts come from the server's own request log."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError, SystemCheckError
from django.urls import reverse

from embeddings_app import encoders, registry, search
from embeddings_app.config import get_config
from embeddings_app.exceptions import ProviderUnavailable
from embeddings_app.models import BackfillRun, EmbeddingVersion, RowFailure
from project.news.models import Article
from tests.backfill_helpers import WORKER_ENV
from tests.conftest import TARGET
from tests.embedding_servers import REJECT_MARKER, FaultServer, max_in_window
from tests.workers import wait_for_run


def short_articles(count: int, reject: set[int] = frozenset()) -> list[Article]:
    return Article.objects.bulk_create([
        Article(title=f"Story {i}", body=(f"{REJECT_MARKER} " if i in reject else "")
                + f"A short report number {i} about markets, sport and films.")
        for i in range(count)])


def stored_vectors(version: EmbeddingVersion) -> dict[int, np.ndarray]:
    return {pk: vector for pk, (vector, _) in version.store.read_all().items()}


def assert_every_row_is_the_servers_vector(version: EmbeddingVersion, drift: bool = False) -> None:
    field = registry.get(TARGET)
    stored = stored_vectors(version)
    for article in Article.objects.all():
        expected = FaultServer.vector(field.source_text(article), drift)
        assert stored[article.pk] is not None, article.pk
        assert float(np.dot(stored[article.pk], expected)) > 0.9999, article.pk


@pytest.mark.worker
def test_transient_faults_wait_and_retry_and_two_workers_stay_within_the_shared_limits(
        fault_server, celery_worker):
    """429 (Retry-After), 500, a timeout and a dropped connection: the batches wait and retry, no
    row fails, every row is embedded; two worker processes share one limit: in every window of
    a tenth of a minute at most a tenth of tokens_per_minute / requests_per_minute arrive."""
    short_articles(48)
    call_command("embeddings", "add", TARGET, "v1", "--model", "api_limited")
    added = len(fault_server.requests_for("fault-embed-limited"))
    worker = celery_worker(concurrency=2, extra_env=WORKER_ENV)
    fault_server.script("429", "500", "timeout", "drop")
    call_command("embeddings", "backfill", TARGET, "v1", "--batch-size", "8")

    version = EmbeddingVersion.objects.get(target=TARGET, version="v1")
    run = wait_for_run(version.runs.first().pk)
    assert run.status == BackfillRun.Status.DONE, run.last_error
    assert (run.rows_embedded, run.rows_failed) == (48, 0)
    assert not RowFailure.objects.filter(version=version).exists()
    assert_every_row_is_the_servers_vector(version)

    log = fault_server.requests_for("fault-embed-limited")
    backfill = log[added:]
    faults = [r.fault for r in backfill if r.fault]
    assert sorted(faults) == ["429", "500", "drop", "timeout"]
    answered = [r for r in backfill if r.status == 200 and not r.fault]
    assert sum(r.inputs for r in answered) == 48  # each row embedded once, none lost
    assert all(r.inputs <= 2 for r in log)  # max_batch_inputs
    # Both worker processes sent requests.
    assert len({line.split("ForkPoolWorker-")[1][:2] for line in worker.log().splitlines()
                if "ForkPoolWorker-" in line and "succeeded" in line}) == 2
    spec = get_config().model("api_limited")
    # Backfill requests (each within a window's budget; add's long probe text went alone, as
    # docs/providers.md says) on the server's clock: arrivals, not reservations.
    tokens, requests = max_in_window(backfill, 60 / 10)
    assert tokens <= spec.tokens_per_minute / 10 and requests <= spec.requests_per_minute / 10
    minute_tokens, minute_requests = max_in_window(log, 60)
    assert minute_tokens <= spec.tokens_per_minute
    assert minute_requests <= spec.requests_per_minute
    assert len(backfill) > spec.requests_per_minute / 10  # the limit did bind: several windows
    assert [r.status for r in log].count(429) == 1  # only the injected one: never over the limit


@pytest.mark.django_db
def test_a_400_for_one_input_fails_only_that_row_and_the_key_never_shows(
        fault_server, admin_client, caplog, capsys):
    short_articles(10, reject={3})
    fault_server.echo_key_on_reject = True  # even a server that echoes the key cannot leak it
    caplog.set_level(logging.DEBUG)
    call_command("embeddings", "add", TARGET, "v1", "--model", "api_fault")
    with pytest.raises(CommandError, match="1 rows have no vector"):
        call_command("embeddings", "backfill", TARGET, "v1", "--inline")

    version = EmbeddingVersion.objects.get(target=TARGET, version="v1")
    run = version.runs.first()
    assert (run.rows_embedded, run.rows_failed) == (9, 1)
    (failure,) = RowFailure.objects.filter(version=version)
    bad = Article.objects.get(body__contains=REJECT_MARKER)
    assert failure.row_key == str(bad.pk)
    assert "the API rejected the input (400)" in failure.error
    assert "[redacted]" in failure.error
    stored = stored_vectors(version)
    assert stored[bad.pk] is None and sum(v is not None for v in stored.values()) == 9

    key = fault_server.api_key
    call_command("embeddings", "status", TARGET)
    shown = [capsys.readouterr().out, failure.error, run.last_error,
             *(record.getMessage() for record in caplog.records),
             admin_client.get(reverse("admin:embeddings_app_embeddingversion_change",
                                      args=[version.pk])).content.decode()]
    assert all(key not in text for text in shown)
    assert "Bearer [redacted]" in shown[-1]  # the admin shows the failure, with the key redacted


@pytest.mark.django_db
def test_queries_use_the_provider_and_cache_and_an_outage_raises_a_clear_error(fault_server):
    short_articles(6)
    call_command("embeddings", "add", TARGET, "v1", "--model", "api_fault")
    call_command("embeddings", "backfill", TARGET, "v1", "--inline")
    call_command("embeddings", "activate", TARGET, "v1", "--force")
    field = registry.get(TARGET)
    target = Article.objects.get(title="Story 2")
    fault_server.reset()
    (first,) = search.search(field, field.source_text(target), k=1)
    assert first.pk == target.pk  # the query vector came from the server
    search.search(field, field.source_text(target), k=1)
    assert len(fault_server.requests) == 1  # the second time from the query cache

    fault_server.outage = True
    with pytest.raises(ProviderUnavailable, match=r'alias "api_fault" .* is unavailable: server '
                                                  r"error 503.*try again later"):
        search.search(field, "a query never asked before", k=1)
    assert {r.model for r in fault_server.requests} == {"fault-embed-1"}  # no other model, ever

    # A probe during the outage fails loudly but gives no verdict on the model's output.
    with pytest.raises(CommandError, match="probes failed"):
        call_command("embeddings", "probe", TARGET)
    assert EmbeddingVersion.objects.get(target=TARGET, version="v1").probe_passed is None


@pytest.mark.django_db
def test_a_changed_output_under_the_same_name_fails_probe_verify_and_check_deploy(
        fault_server, capsys):
    short_articles(8)
    call_command("embeddings", "add", TARGET, "v1", "--model", "api_fault")
    call_command("embeddings", "backfill", TARGET, "v1", "--inline")
    call_command("embeddings", "verify", TARGET, "v1")
    call_command("embeddings", "activate", TARGET, "v1", "--force")
    call_command("embeddings", "probe", TARGET)
    assert "probes match (min cosine 1.00000" in capsys.readouterr().out
    call_command("check", "--deploy")  # nothing to report yet

    fault_server.drift = True  # the provider silently updates the model behind the name
    encoders.clear_cache()
    with pytest.raises(CommandError, match="probes failed"):
        call_command("embeddings", "probe", TARGET)
    out = capsys.readouterr().out
    cosines = [float(value) for value in out.split("cosines ")[1].split()]
    assert max(cosines) < 0.9  # measured against the stored probe vectors
    with pytest.raises(CommandError, match="probes: the model's output changed under the same"):
        call_command("embeddings", "verify", TARGET, "v1")
    with pytest.raises(SystemCheckError, match=r"embeddings\.E103"):
        call_command("check", "--deploy")
    call_command("embeddings", "status", TARGET)
    assert "CHANGED (" in capsys.readouterr().out


@pytest.mark.django_db
def test_a_save_during_an_api_outage_goes_through_and_leaves_the_row_stale_for_the_sweep(
        fault_server):
    short_articles(4)
    call_command("embeddings", "add", TARGET, "v1", "--model", "api_fault")
    call_command("embeddings", "backfill", TARGET, "v1", "--inline")
    version = EmbeddingVersion.objects.get(target=TARGET, version="v1")
    article = Article.objects.get(title="Story 1")
    fault_server.outage = True
    article.body = "A new text written while the embedding API is down."
    article.save()  # the dual-write ("sync") cannot embed it: the save still succeeds
    assert Article.objects.get(pk=article.pk).body == article.body
    field = registry.get(TARGET)
    from embeddings_app import sync

    assert sync.count_stale(field, [version]) == [1]
    assert not RowFailure.objects.exists()  # an outage is no row's fault
    fault_server.outage = False
    assert sync.sync_queryset(field) == 1  # what the sweep task runs
    assert_every_row_is_the_servers_vector(version)
