"""`migrate` (issue 4, acceptance 6): killed in the middle of its backfill and run again, it
resumes and ends in the state an uninterrupted run gives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from django.core.management import call_command

from embeddings_app import encoders, indexes, lifecycle
from embeddings_app.config import get_config
from embeddings_app.models import BackfillRun, EmbeddingVersion, State
from project.news.models import Article
from tests.conftest import TARGET
from tests.workers import ROOT, database_url

pytestmark = pytest.mark.django_db(transaction=True)


def manage(*args: str) -> subprocess.Popen:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings",
           "DATABASE_URL": database_url(), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "manage.py", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("layout", ["column", "table"])
def test_migrate_killed_mid_backfill_resumes_to_the_uninterrupted_end_state(make_articles, layout):
    """v1 in a column; v2 migrated into ``layout`` (``migrate --layout``), killed and resumed."""
    make_articles(400)
    call_command("embeddings", "migrate", TARGET, "--to", "tiny_other", "--inline")
    assert Article.embedding.active().version == "v1"

    first = manage("embeddings", "migrate", TARGET, "--to", "tiny", "--layout", layout,
                   "--inline", "--batch-size", "4")
    deadline = time.monotonic() + 120
    processed = 0
    while time.monotonic() < deadline and first.poll() is None:
        run = BackfillRun.objects.filter(version__version="v2").first()
        processed = run.rows_processed if run else 0
        if processed >= 40:
            os.kill(first.pid, signal.SIGKILL)  # a crash: no cleanup at all
            break
        time.sleep(0.02)
    first.wait()
    assert first.returncode == -signal.SIGKILL, first.stdout.read()
    v2 = EmbeddingVersion.objects.get(target=TARGET, version="v2")
    assert v2.state == State.BACKFILLING and 40 <= processed < 400
    assert v2.layout == layout
    assert Article.embedding.active().version == "v1"  # reads never saw the half-built v2

    second = manage("embeddings", "migrate", TARGET, "--to", "tiny", "--inline")
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out
    assert "[1/5] add: resuming news.Article.embedding@v2 (backfilling)" in out
    for step in ("[2/5] backfill v2", "[3/5] index v2", "[4/5] verify v2", "[5/5] activate v2"):
        assert step in out, out
    resumed = BackfillRun.objects.filter(version=v2).first()
    assert 0 < resumed.rows_embedded <= 400 - processed  # rows done before the kill were kept

    # The end state of an uninterrupted migrate: v2 active, complete, fresh, verified, indexed;
    # every vector what the model computes; v1 on standby for rollback.
    v2.refresh_from_db()
    assert v2.state == State.ACTIVE and v2.verify_passed
    assert lifecycle.readiness(v2).problems == []
    assert indexes.index_state(v2) == "valid"
    assert EmbeddingVersion.objects.get(target=TARGET, version="v1").state == State.STANDBY
    assert list(v2.events.values_list("to_state", flat=True)).count(State.ACTIVE) == 1
    rows = list(Article.objects.order_by("pk"))
    fresh = encoders.load(get_config().model("tiny")).encode_documents(
        [row.embedding.text for row in rows])
    stored = np.vstack([v2.store.read_vector(row.pk) for row in rows])
    np.testing.assert_allclose(stored, fresh, atol=1e-5)
    assert Article.embedding.search("oil prices", k=3)[0].embedding_version == "v2"

    # Run again once complete: nothing left to do, it says so and changes nothing.
    third = manage("embeddings", "migrate", TARGET, "--to", "tiny", "--inline")
    out, _ = third.communicate(timeout=300)
    assert third.returncode == 1 and "already reads from a version of model tiny" in out
