"""Backfill row policy (bad rows), UUID primary keys, and resume after a crash."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from django.core.management import CommandError, call_command

from embeddings_app import backfill, encoders, registry, tasks
from embeddings_app.models import BackfillBatch, BackfillRun, EmbeddingVersion, RowFailure, State
from project.news.models import Ticket
from tests.backfill_helpers import (
    WORKER_ENV,
    all_vectors,
    assert_every_row_fresh,
    create_articles,
)
from tests.conftest import TARGET
from tests.workers import wait_for_run

pytestmark = pytest.mark.usefixtures("layout")  # both layouts

TICKETS = "news.Ticket.embedding"


def _tickets(count: int) -> list[Ticket]:
    return Ticket.objects.bulk_create([
        Ticket(subject=f"Printer {i} is jammed", raw_body=f"Ticket {i}: paper stuck in tray {i % 3}"
               .encode()) for i in range(count)
    ])


@pytest.mark.django_db(transaction=True)
def test_bad_rows_follow_the_policy_and_never_block_their_batch(capsys):
    good = _tickets(6)
    empty = Ticket.objects.create(subject="", raw_body=b"")  # callable returns None
    none = Ticket.objects.create(subject="", raw_body=None)  # callable returns None
    long_text = " ".join(f"word{i % 997}" for i in range(40_000))[:200_000]
    assert len(long_text) == 200_000
    long = Ticket.objects.create(subject="", raw_body=long_text.encode())
    bad = Ticket.objects.create(subject="Caf\u00e9", raw_body=b"caf\xe9 au lait \xff\xfe")
    assert "\udce9" in registry.get(TICKETS).source_text(bad)  # a lone surrogate
    call_command("embeddings", "add", TICKETS, "v1", "--model", "tiny")
    # add's truncation count leaves the row the tokenizer rejects out, and says so.
    counted = EmbeddingVersion.objects.get(target=TICKETS, version="v1").truncation
    assert (counted["sampled"], counted["counted"], counted["uncountable"]) == (10, 7, 1)
    assert counted["over"] == 1 and counted["max_overflow"] > 30_000  # the 200,000-char row

    with pytest.raises(CommandError, match="could not be embedded"):
        call_command("embeddings", "backfill", TICKETS, "v1", "--inline", "--batch-size", "4")

    version = EmbeddingVersion.objects.get(target=TICKETS, version="v1")
    run = BackfillRun.objects.get(version=version)
    assert version.state == State.FAILED  # never "ready" with a row missing
    assert run.batches_done == run.batches_total == 3  # every batch ran to its end
    assert not run.batches.exclude(status=BackfillBatch.Status.DONE).exists()
    assert (run.rows_processed, run.rows_embedded, run.rows_skipped, run.rows_failed) == (
        10, 7, 2, 1)
    failure = RowFailure.objects.get(version=version)
    assert (failure.row_key, failure.run_id) == (str(bad.pk), run.pk)
    assert "TypeError" in failure.error

    field = registry.get(TICKETS)
    stored = all_vectors(field, version)
    encoder = encoders.for_version(version)
    for obj in [*good, long]:
        vector, source_hash = stored[obj.pk]
        assert vector is not None and source_hash == field.source_hash(field.source_text(obj))
    # Over-long: the tokenizer truncates it to max_seq_length tokens, so the vector is that of
    # the text's beginning (5,000 characters are far more than 256 tokens).
    assert encoder.model.max_seq_length == 256
    expected = encoder.encode_documents([long_text, long_text[:5000]])
    np.testing.assert_allclose(stored[long.pk][0], expected[0], atol=2e-5)
    np.testing.assert_allclose(expected[0], expected[1], atol=2e-5)
    for obj in (empty, none):  # no vector, but the (empty) source is recorded: covered
        assert stored[obj.pk] == (None, field.source_hash(""))
    assert stored[bad.pk] == (None, None)  # missing: a resumed backfill retries it
    assert version.store.coverage() == (9, 10)

    capsys.readouterr()
    call_command("embeddings", "status", TICKETS)
    out = capsys.readouterr().out
    assert "1 rows" in out and "failed 1" in out and "could not be embedded" in out

    # Fix the row's data; resuming embeds just that row, never the 9 already fresh.
    Ticket.objects.filter(pk=bad.pk).update(raw_body="café au lait".encode())
    call_command("embeddings", "backfill", TICKETS, "v1", "--inline", "--batch-size", "4")
    resumed = BackfillRun.objects.filter(version=version).first()
    assert (resumed.status, resumed.rows_processed, resumed.rows_embedded) == ("done", 10, 1)
    version.refresh_from_db()
    assert version.state == State.READY
    capsys.readouterr()
    call_command("embeddings", "status", TICKETS)
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(TICKETS))
    assert " ready " in line and "rows" not in line  # the failure was resolved by the resume
    assert RowFailure.objects.filter(version=version).count() == 1  # history is kept


@pytest.mark.worker
def test_uuid_primary_key_backfills_on_workers(celery_worker):
    tickets = _tickets(180)
    call_command("embeddings", "add", TICKETS, "v1", "--model", "tiny")
    version = EmbeddingVersion.objects.get(target=TICKETS, version="v1")
    run, ranges = backfill.start(version, batch_size=40)
    assert len(ranges) == 5 and ranges[0][0] is None and ranges[-1][1] is None
    # A row inserted after planning with a key below every bound is still covered.
    low = Ticket.objects.create(id="00000000-0000-4000-8000-000000000000", subject="Early key",
                                raw_body=b"inserted after planning")
    celery_worker(concurrency=2, extra_env=WORKER_ENV)
    tasks.dispatch(run, ranges)
    run = wait_for_run(run.pk)
    assert run.status == BackfillRun.Status.DONE, run.last_error
    assert assert_every_row_fresh(TICKETS, "v1") == len(tickets) + 1
    assert all_vectors(registry.get(TICKETS), version)[uuid.UUID(low.pk)][0] is not None


@pytest.mark.django_db(transaction=True)
def test_resume_after_a_crash_continues_where_it_stopped():
    rows = 120
    create_articles(rows)
    call_command("embeddings", "add", TARGET, "v2", "--model", "tiny")
    version = EmbeddingVersion.objects.get(target=TARGET, version="v2")
    crashed, _ranges = backfill.start(version, batch_size=20)
    for number in range(3):  # three of six batches ran, then every worker died
        backfill.run_batch(crashed.pk, number)

    call_command("embeddings", "backfill", TARGET, "v2", "--inline", "--batch-size", "20")

    crashed.refresh_from_db()
    assert crashed.status == BackfillRun.Status.FAILED
    assert crashed.last_error.startswith("superseded by run")
    resumed = BackfillRun.objects.filter(version=version).first()
    assert resumed.pk != crashed.pk
    assert (resumed.status, resumed.rows_processed, resumed.rows_embedded) == ("done", rows, 60)
    # A late batch of the superseded run does nothing.
    assert backfill.run_batch(crashed.pk, 4).embedded == 0
    assert assert_every_row_fresh(TARGET, "v2") == rows
