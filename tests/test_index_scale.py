"""Index builds at scale: the memory estimate printed first, the build session's
``maintenance_work_mem`` and ``max_parallel_maintenance_workers`` (flags, then settings, within the
server's limits) confirmed by the server itself, the warning when the graph will not fit, one
build of an index at a time, and the admin's "Build index" on a real Celery worker."""

from __future__ import annotations

import time

import numpy as np
import pytest
from django.core.management import CommandError, call_command
from django.db import connection, transaction
from django.test import override_settings

from embeddings_app import config, indexes, lifecycle
from embeddings_app.config import get_config
from embeddings_app.models import EmbeddingVersion, VersionEvent
from project.news.models import Article
from tests.conftest import TARGET
from tests.test_admin import OPERATOR_PERMS, admin_messages, login, make_user, step_url

pytestmark = pytest.mark.django_db(transaction=True)  # indexes are built CONCURRENTLY


def server_setting(name: str) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting(%s)", [name])
        return cursor.fetchone()[0]


def version_with_vectors(rows: int, seed: int = 0) -> EmbeddingVersion:
    """v1 of the tiny model (32 dimensions) over ``rows`` short articles, its vectors written
    through the store (random unit vectors: what is measured here is the index, not a model)."""
    Article.objects.bulk_create([Article(title=f"Article {i}", body=f"Body {i}")
                                 for i in range(rows)])
    version = lifecycle.add(TARGET, "v1", "tiny")
    vectors = np.random.default_rng(seed).normal(size=(rows, 32)).astype(np.float32)
    field = Article.embedding
    pks = list(Article.objects.order_by("pk").values_list("pk", flat=True))
    with transaction.atomic():
        version.store.write([(pk, field.source_hash(f"x{pk}"), vector)
                             for pk, vector in zip(pks, vectors, strict=True)])
    return version


def test_index_prints_the_estimate_first_and_the_session_runs_with_the_flags_settings(capsys):
    version = version_with_vectors(60)
    default_memory = server_setting("maintenance_work_mem")
    call_command("embeddings", "index", TARGET, "v1", "--maintenance-work-mem", "96MB",
                 "--parallel-workers", "1")
    out = capsys.readouterr().out.splitlines()
    # 1.3 x 60 x (8 + 4 x 32) = 10,608 bytes
    assert out[0] == (f"Index memory estimate for {TARGET}@v1: 1.3 x 60 rows x (8 + 4 x 32) bytes "
                      "= 11kB (pgvector#844).")
    assert out[1] == ("Build session: maintenance_work_mem 96MB (--maintenance-work-mem), "
                      "max_parallel_maintenance_workers 1 (--parallel-workers).")
    assert out[-1].startswith(f"Index {version.store.index_name()} on ")
    assert indexes.index_state(version) == "valid"

    # The same through the API: the server's own reading of the build session's settings, and
    # this connection's settings back to the server's afterwards.
    plans: list[indexes.BuildPlan] = []
    lifecycle.build_index(TARGET, "v1", m=8, ef_construction=32, maintenance_work_mem="80MB",
                          parallel_workers=0, on_plan=plans.append)
    assert plans[-1].session == {"maintenance_work_mem": "80MB",
                                 "max_parallel_maintenance_workers": "0"}
    assert server_setting("maintenance_work_mem") == default_memory


def test_settings_apply_when_no_flag_is_given_and_are_validated_with_check_ids():
    version = version_with_vectors(20)
    settings = {**get_config_raw(), "INDEX_MAINTENANCE_WORK_MEM": "72MB",
                "INDEX_PARALLEL_WORKERS": 1}
    with override_settings(EMBEDDINGS=settings):
        plans: list[indexes.BuildPlan] = []
        indexes.build(version, on_plan=plans.append)
    assert (plans[0].memory_source, plans[0].workers_source) == (
        'EMBEDDINGS["INDEX_MAINTENANCE_WORK_MEM"]', 'EMBEDDINGS["INDEX_PARALLEL_WORKERS"]')
    assert plans[-1].session == {"maintenance_work_mem": "72MB",
                                 "max_parallel_maintenance_workers": "1"}

    def problems(**keys: object) -> list[tuple[str, str]]:
        return [(p.id, p.message) for p in config.validate({**get_config_raw(), **keys})]

    assert problems(INDEX_MAINTENANCE_WORK_MEM="2GB", INDEX_PARALLEL_WORKERS=4) == []
    assert problems(INDEX_MAINTENANCE_WORK_MEM=512) == []  # a bare number is MB
    assert problems(INDEX_MAINTENANCE_WORK_MEM="lots") == [(
        "embeddings.E050", 'EMBEDDINGS["INDEX_MAINTENANCE_WORK_MEM"] must be a memory size from '
        "1MB to 2047GB (e.g. 512MB, 2GB; a bare number is MB), not 'lots'.")]
    assert problems(INDEX_MAINTENANCE_WORK_MEM="3TB")[0][0] == "embeddings.E050"
    assert problems(INDEX_PARALLEL_WORKERS=-1) == [(
        "embeddings.E051", 'EMBEDDINGS["INDEX_PARALLEL_WORKERS"] must be an integer from 0 to '
        "1024, not -1.")]
    assert problems(INDEX_PARALLEL_WORKERS=True)[0][0] == "embeddings.E051"


def get_config_raw() -> dict:
    from django.conf import settings

    return dict(settings.EMBEDDINGS)


def test_a_graph_larger_than_maintenance_work_mem_is_warned_and_the_server_says_so_too(capsys):
    # 1.3 x 7,000 x (8 + 4 x 32) = 1.24 MB > 1 MB
    version_with_vectors(7000)
    call_command("embeddings", "index", TARGET, "v1", "--maintenance-work-mem", "1MB")
    captured = capsys.readouterr()
    assert "= 2MB (pgvector#844)." in captured.out  # 1,237,600 bytes, rounded up
    assert ("Warning: The estimate (2MB) exceeds maintenance_work_mem (1MB): once the graph no "
            "longer fits, the build slows down sharply. Give it --maintenance-work-mem 2MB (or "
            'EMBEDDINGS["INDEX_MAINTENANCE_WORK_MEM"]) if the server has the memory.') \
        in captured.err
    # pgvector's own notice, raised only because the session had 1 MB (the server's is 64 MB).
    assert "PostgreSQL: hnsw graph no longer fits into maintenance_work_mem after " in captured.err


def test_parallel_workers_above_the_servers_limit_are_capped_with_a_note(capsys):
    version_with_vectors(20)
    limit = server_setting("max_parallel_workers")
    call_command("embeddings", "index", TARGET, "v1", "--parallel-workers", "1024")
    out = capsys.readouterr().out
    assert (f"max_parallel_maintenance_workers {limit} (--parallel-workers)." in out)
    assert (f"Parallel workers capped at {limit}: the server's max_parallel_workers (of "
            f"max_worker_processes {server_setting('max_worker_processes')}); 1024 were asked "
            "for.") in out


@pytest.mark.parametrize(("args", "message"), [
    (["--maintenance-work-mem", "512kB"], "The build's maintenance_work_mem must be a memory size "
     "from 1MB to 2047GB (e.g. 512MB, 2GB; a bare number is MB), not '512kB'. "
     "[--maintenance-work-mem]"),
    (["--maintenance-work-mem", "2XB"], "The build's maintenance_work_mem must be a memory size "
     "from 1MB to 2047GB (e.g. 512MB, 2GB; a bare number is MB), not '2XB'. "
     "[--maintenance-work-mem]"),
    (["--parallel-workers", "-1"], "The build's parallel workers must be an integer from 0 to "
     "1024, not -1. [--parallel-workers]"),
])
def test_bad_build_settings_are_refused_with_one_line_and_nothing_is_built(args, message):
    version = version_with_vectors(10)
    with pytest.raises(CommandError) as refused:
        call_command("embeddings", "index", TARGET, "v1", "--ef-search", "77", *args)
    assert str(refused.value) == message
    version.refresh_from_db()
    assert (indexes.index_state(version), version.hnsw_ef_search) == ("none", 40)


def test_a_second_build_of_an_index_is_refused_while_another_session_builds_it():
    version = version_with_vectors(10)
    name = version.store.index_name()
    other = connection.get_new_connection(connection.get_connection_params())
    try:
        other.execute("SELECT pg_advisory_lock(%s, %s)",
                      indexes.build_lock_key(name))  # what a running build holds
        with pytest.raises(CommandError) as refused:
            call_command("embeddings", "index", TARGET, "v1")
        assert str(refused.value) == (
            f"Index {name} of {TARGET}@v1 is being built by another session; wait for it "
            "(`embeddings status` and the admin show its progress).")
        assert indexes.index_state(version) == "none"
    finally:
        other.close()
    call_command("embeddings", "index", TARGET, "v1")  # the lock is gone with its session
    assert indexes.index_state(version) == "valid"


def test_the_admins_build_index_runs_on_a_real_worker_and_records_its_plan(celery_worker):
    version = version_with_vectors(300)
    worker = celery_worker(concurrency=1)
    client = login(make_user("operator", staff=True, codenames=OPERATOR_PERMS))
    shown = admin_messages(client, client.post(step_url(version, "index")))
    queue = get_config().queue
    assert shown == [f"Index build of {TARGET}@v1 sent to queue '{queue}'; its progress shows "
                     "below and its result in the history."]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not VersionEvent.objects.filter(
            version=version, note__startswith="index ").exclude(
            note__startswith="index build sent").exists():
        time.sleep(0.5)
    notes = list(version.events.values_list("actor", "note"))
    assert ("admin:operator", f"index build sent to queue '{queue}'") in notes
    built = [note for actor, note in notes if note.startswith(f"index {version.store.index_name()} "
                                                              "built and valid (")]
    assert len(built) == 1, (notes, worker.log())
    assert "Index memory estimate for news.Article.embedding@v1: 1.3 x 300 rows x (8 + 4 x 32) " \
        "bytes = 52kB (pgvector#844)." in built[0]
    assert indexes.index_state(version) == "valid"
    assert "embeddings_app.build_index" in worker.log()


def test_the_admin_refuses_to_index_a_retired_version_like_the_command():
    version_with_vectors(5)
    lifecycle.retire(TARGET, "v1")
    with pytest.raises(CommandError) as refused:
        call_command("embeddings", "index", TARGET, "v1")
    client = login(make_user("operator", staff=True, codenames=OPERATOR_PERMS))
    version = EmbeddingVersion.objects.get_version(TARGET, "v1")
    assert admin_messages(client, client.post(step_url(version, "index"))) == [str(refused.value)]
    assert not version.events.filter(note__startswith="index build sent").exists()
