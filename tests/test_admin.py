"""The EmbeddingVersion admin (issue 5), through Django's test client: permissions, CSRF, the same
refusals as the command line, a bounded number of queries, the detail page's records."""

from __future__ import annotations

import html
import re
import time
from collections.abc import Callable

import pytest
from django.contrib.auth.models import Permission, User
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from embeddings_app import backfill, lifecycle
from embeddings_app.config import get_config
from embeddings_app.models import BackfillRun, EmbeddingVersion, RowFailure, State, VersionEvent
from project.news.models import Article
from tests.conftest import TARGET

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("layout")]  # both layouts

PASSWORD = "pw-for-tests"
LIST_URL = reverse("admin:embeddings_app_embeddingversion_changelist")
STATUS_URL = reverse("admin:embeddings_app_embeddingversion_status")
STEPS = ("backfill", "index", "verify", "activate", "rollback", "retire", "drop")


def step_url(version: EmbeddingVersion, step: str) -> str:
    return reverse("admin:embeddings_app_embeddingversion_lifecycle", args=[version.pk, step])


def change_url(version: EmbeddingVersion) -> str:
    return reverse("admin:embeddings_app_embeddingversion_change", args=[version.pk])


def make_user(username: str, *, staff: bool, codenames: tuple[str, ...] = ()) -> User:
    user = User.objects.create_user(username, password=PASSWORD, is_staff=staff)
    user.user_permissions.set(Permission.objects.filter(
        content_type__app_label="embeddings_app", codename__in=codenames))
    return user


OPERATOR_PERMS = ("view_embeddingversion", "run_backfill", "switch_active", "drop_version")


@pytest.fixture
def operator() -> User:
    return make_user("operator", staff=True, codenames=OPERATOR_PERMS)


@pytest.fixture
def viewer() -> User:
    return make_user("viewer", staff=True, codenames=("view_embeddingversion",))


def login(user: User, **client_kwargs: object) -> Client:
    client = Client(**client_kwargs)
    assert client.login(username=user.username, password=PASSWORD)
    return client


@pytest.fixture
def two_versions(make_articles: Callable[[int], list]) -> tuple[EmbeddingVersion, EmbeddingVersion]:
    """v1 active (backfilled, indexed), v2 added but not backfilled, on 12 real articles."""
    make_articles(12)
    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny")
    call_command("embeddings", "add", TARGET, "v2", "--model", "tiny_other")
    v1 = EmbeddingVersion.objects.get(target=TARGET, version="v1")
    run, ranges = backfill.start(v1, batch_size=5, mode="inline")
    backfill.run_inline(run, ranges)
    v1.refresh_from_db()
    # Whatever activation requires now (complete and fresh, perhaps verified and indexed), v1 is
    # switched on directly: these tests are about v2 and the admin, not about v1's cutover.
    lifecycle.transition(v1, State.ACTIVE, actor="test")
    return v1, EmbeddingVersion.objects.get(target=TARGET, version="v2")


def snapshot() -> list[tuple]:
    """Everything an action could change in the admin's records."""
    return [
        list(EmbeddingVersion.objects.order_by("pk").values_list("pk", "state", "verified_at")),
        VersionEvent.objects.count(), BackfillRun.objects.count(),
    ]


# --- acceptance 2: permissions and CSRF -------------------------------------------------------
def test_staff_without_the_permissions_sees_read_only_and_cannot_run_any_step(two_versions, viewer):
    v1, v2 = two_versions
    client = login(viewer)
    before = snapshot()
    response = client.get(change_url(v2))
    assert response.status_code == 200
    page = response.content.decode()
    assert "Read-only" in page
    assert not re.search(r'id="ev-step-', page)  # no lifecycle button at all
    assert client.get(LIST_URL).status_code == 200
    for version in (v1, v2):
        for step in STEPS:
            response = client.post(step_url(version, step), {"confirm": "yes", "yes": "on"})
            assert response.status_code == 403, (version, step)
            assert client.get(step_url(version, step)).status_code == 403, (version, step)
    assert snapshot() == before


def test_a_permission_allows_only_its_own_group_of_steps(two_versions):
    _v1, v2 = two_versions
    backfiller = make_user("backfiller", staff=True,
                           codenames=("view_embeddingversion", "run_backfill"))
    client = login(backfiller)
    before = snapshot()
    for step in ("activate", "rollback", "retire", "drop"):
        assert client.post(step_url(v2, step), {"confirm": "yes"}).status_code == 403, step
    assert snapshot() == before


def test_non_staff_is_redirected_to_login_everywhere(two_versions):
    _v1, v2 = two_versions
    outsider = make_user("outsider", staff=False, codenames=OPERATOR_PERMS)
    client = login(outsider)
    before = snapshot()
    for url in (LIST_URL, change_url(v2), f"{STATUS_URL}?id={v2.pk}", step_url(v2, "activate")):
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith(reverse("admin:login")), url
    response = client.post(step_url(v2, "activate"), {"confirm": "yes"})
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))
    assert snapshot() == before


def test_a_post_without_csrf_token_is_refused_and_changes_nothing(two_versions, operator):
    _v1, v2 = two_versions
    client = login(operator, enforce_csrf_checks=True)
    before = snapshot()
    for step in STEPS:
        response = client.post(step_url(v2, step), {"confirm": "yes", "yes": "on"})
        assert response.status_code == 403, step
        assert b"CSRF" in response.content, step
    assert snapshot() == before

    # The same POST with the token from the confirmation page goes through: the 403s above are
    # the CSRF check, not something else.
    page = client.get(step_url(v2, "retire")).content.decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    response = client.post(step_url(v2, "retire"), {"confirm": "yes", "csrfmiddlewaretoken": token})
    assert response.status_code == 302
    v2.refresh_from_db()
    assert v2.state == State.RETIRED


# --- acceptance 3: the same refusal as the command line ---------------------------------------
def admin_messages(client: Client, response) -> list[str]:  # type: ignore[no-untyped-def]
    """The messages of the page the step redirects to, as shown on it (read from the HTML)."""
    assert response.status_code == 302, response.status_code
    page = client.get(response["Location"]).content.decode()
    found = re.search(r'<ul class="messagelist">(.*?)</ul>', page, re.S)
    assert found, "no message shown"
    return [html.unescape(item.strip()) for item in re.findall(r"<li[^>]*>(.*?)</li>", found.group(1), re.S)]


@pytest.mark.parametrize("step, argv", [
    ("activate", ["activate", TARGET, "v2"]),  # v2 is new: not backfilled
    ("drop", ["drop", TARGET, "v2", "--yes"]),  # v2 is not retired
    ("rollback", ["rollback", TARGET]),  # no standby version
])
def test_a_refusal_shows_the_same_message_as_the_command(two_versions, operator, step, argv):
    _v1, v2 = two_versions
    before = snapshot()
    with pytest.raises(CommandError) as refused:
        call_command("embeddings", *argv)
    assert snapshot() == before
    client = login(operator)
    shown = admin_messages(client, client.post(step_url(v2, step), {"confirm": "yes"}))
    assert shown == [str(refused.value)]
    assert snapshot() == before


def test_activating_an_incomplete_ready_version_is_refused_with_the_command_message(
        two_versions, operator):
    _v1, v2 = two_versions
    lifecycle.transition(v2, State.READY, actor="test")  # claims ready, but no row has a vector
    before = snapshot()
    with pytest.raises(CommandError) as refused:
        call_command("embeddings", "activate", TARGET, "v2")
    assert "12 of 12 rows have no vector" in str(refused.value)
    client = login(operator)
    shown = admin_messages(client, client.post(step_url(v2, "activate"), {"confirm": "yes"}))
    assert shown == [str(refused.value)]
    assert snapshot() == before


# --- the confirmation pages and the steps themselves ------------------------------------------
def test_confirmation_page_states_what_will_happen_and_get_changes_nothing(two_versions, operator):
    v1, v2 = two_versions
    client = login(operator)
    before = snapshot()
    page = client.get(step_url(v2, "activate")).content.decode()
    assert f"Reads of {TARGET} switch to {TARGET}@v2" in page
    assert f"{TARGET}@v1 (" in page and "becomes standby" in page
    # A POST without the confirmation field shows the page again instead of acting.
    assert client.post(step_url(v2, "activate")).status_code == 200
    page = client.get(step_url(v1, "retire")).content.decode()
    assert "stops being written on every save" in page
    assert snapshot() == before


@pytest.mark.django_db(transaction=True)  # drop refuses to run inside a transaction
def test_retire_then_drop_through_the_admin(two_versions, operator):
    _v1, v2 = two_versions
    client = login(operator)
    shown = admin_messages(client, client.post(step_url(v2, "retire"), {"confirm": "yes"}))
    assert shown == [f"{TARGET}@v2 retired: no longer written."]
    page = client.get(step_url(v2, "drop")).content.decode()
    what = (f"columns {v2.column} and {v2.hash_column} of table news_article"
            if v2.layout == "column" else "table news_article_embedding_v2")
    assert f"Drops {what}" in page
    shown = admin_messages(client, client.post(step_url(v2, "drop"), {"confirm": "yes"}))
    assert shown[0].startswith(f"{TARGET}@v2 dropped: {what}")
    v2.refresh_from_db()
    assert v2.state == State.DROPPED
    assert list(v2.events.values_list("to_state", "actor"))[-2:] == [
        ("retired", "admin:operator"), ("dropped", "admin:operator")]


# --- the detail page -------------------------------------------------------------------------
def test_detail_page_shows_model_history_runs_chart_and_failures_with_row_links(
        two_versions, operator):
    v1, _v2 = two_versions
    run = v1.runs.get()
    article_pk = Article.objects.order_by("pk").first().pk
    RowFailure.objects.create(version=v1, run=run, row_key=str(article_pk),
                              error="ValueError: text too odd to embed")
    RowFailure.objects.create(version=v1, run=run, row_key="999999999",
                              error="ValueError: row gone")
    client = login(operator)
    page = client.get(change_url(v1)).content.decode()
    assert v1.fingerprint in page and v1.revision in page
    assert "admin:operator" not in page and ">test<" in page  # the actor of v1's activation
    assert re.search(r"<td>new</td><td>backfilling</td>", page.replace("\n", ""))
    assert f"<td>{run.pk}</td><td>done</td><td>inline</td>" in page
    assert "12 / 12" in page
    assert '<svg class="ev-chart"' in page
    article_url = reverse("admin:news_article_change", args=[article_pk])
    assert f'<a href="{article_url}">{article_pk}</a>' in page
    assert "ValueError: text too odd to embed" in page
    assert "Row failures (2)" in page


def test_backfill_samples_give_the_chart_its_points(make_articles, operator):
    make_articles(30)
    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny")
    version = EmbeddingVersion.objects.get(target=TARGET, version="v1")
    run, ranges = backfill.start(version, batch_size=10, mode="inline")
    backfill.run_inline(run, ranges)
    run.refresh_from_db()
    rows = [rows for _, rows in run.progress_samples]
    times = [t for t, _ in run.progress_samples]
    assert rows == sorted(rows) and rows[-1] == 30
    assert times == sorted(times)
    assert run.started_at.timestamp() - 1 <= times[0]
    client = login(operator)
    data = client.get(STATUS_URL, {"id": version.pk, "chart": version.pk}).json()
    assert 'class="ev-chart"' in data["chart"]
    assert f'data-points="{len(run.progress_samples) + 1}"' in data["chart"]
    status = data["versions"][str(version.pk)]
    assert (status["state"], status["done"], status["total"], status["percent"]) == (
        "ready", 30, 30, 100.0)


def test_status_endpoint_reports_a_running_backfill_from_its_progress_record(
        two_versions, operator):
    v1, v2 = two_versions
    run, _ranges = backfill.start(v2, batch_size=5, mode="inline")
    # As a first batch of 5 rows records it (the batches themselves are the backfill's tests).
    BackfillRun.objects.filter(pk=run.pk).update(rows_processed=5, batches_done=1)
    client = login(operator)
    status = client.get(STATUS_URL, {"id": [v1.pk, v2.pk]}).json()["versions"][str(v2.pk)]
    assert status["state"] == "backfilling"
    assert (status["done"], status["total"]) == (5, 12)
    assert status["percent"] == pytest.approx(100 * 5 / 12)
    assert status["running"] is True
    assert status["rate"] > 0 and status["eta_seconds"] >= 0
    assert status["rate_label"].endswith(tuple("0123456789")) and "ETA" in status["rate_label"]


# --- acceptance 4: bounded queries, no COUNT(*) over the embedded table -----------------------
def fifty_versions_across_ten_targets() -> None:
    """9 fake targets (not in the registry) with 5 versions each, plus 5 on the real one."""
    states = [State.ACTIVE, State.STANDBY, State.BACKFILLING, State.FAILED, State.RETIRED]
    for t in range(9):
        for i, state in enumerate(states):
            version = EmbeddingVersion.objects.create(
                target=f"fake{t}.Thing.embedding", version=f"v{i}", model_alias="tiny",
                model_name="/models/tiny-bert", revision="r1", fingerprint="f" * 64, dimensions=32,
                column=f"embedding_v{i}", hash_column=f"embedding_v{i}_source_hash", state=state)
            run = BackfillRun.objects.create(version=version, batch_size=10, batches_total=10,
                                             rows_total=1000, rows_processed=100 * (i + 1),
                                             status="running" if state == State.BACKFILLING
                                             else "done")
            RowFailure.objects.create(version=version, run=run, row_key=str(i), error="boom")


def reads_the_table(sql: str) -> bool:
    return re.search(r'\bFROM\s+"?news_article"?(\s|$|\))', sql) is not None


def list_page_queries(client: Client) -> tuple[int, list[str]]:
    with CaptureQueriesContext(connection) as captured:
        response = client.get(LIST_URL)
    assert response.status_code == 200
    return len(captured), [query["sql"] for query in captured]


def test_list_page_queries_are_bounded_and_independent_of_rows(make_articles, operator):
    make_articles(5)
    for name in ("v1", "v2", "v3", "v4", "v5"):
        call_command("embeddings", "add", TARGET, name, "--model", "tiny")
    fifty_versions_across_ten_targets()
    assert EmbeddingVersion.objects.count() == 50
    assert EmbeddingVersion.objects.values("target").distinct().count() == 10
    client = login(operator)

    small, sqls = list_page_queries(client)
    page = client.get(LIST_URL).content.decode()
    assert page.count('class="ev-bar-fill"') == 50
    assert "unknown target" in page  # the fake targets render, without an index state
    assert not any(map(reads_the_table, sqls)), "the list must not read the embedded table"

    make_articles(300)  # more rows in the embedded table: same queries
    bigger, sqls = list_page_queries(client)
    assert not any(map(reads_the_table, sqls))
    status_queries = CaptureQueriesContext(connection)
    with status_queries:
        ids = list(EmbeddingVersion.objects.values_list("pk", flat=True))
        assert client.get(STATUS_URL, {"id": ids}).status_code == 200
    assert not any(reads_the_table(q["sql"]) for q in status_queries.captured_queries)

    EmbeddingVersion.objects.filter(target__startswith="fake").exclude(version="v0").delete()
    fewer, _ = list_page_queries(client)  # 14 versions instead of 50: same queries

    print(f"list page: {small} queries (50 versions, 5 rows), {bigger} (305 rows), "
          f"{fewer} (14 versions); status endpoint: {len(status_queries.captured_queries)}")
    assert small == bigger == fewer
    assert small <= 15


# --- start backfill: dispatched to real Celery workers, as `embeddings backfill` does ----------
@pytest.mark.worker
def test_start_backfill_dispatches_batches_to_real_workers(two_versions, operator, celery_worker):
    _v1, v2 = two_versions
    worker = celery_worker(concurrency=1)
    client = login(operator)
    shown = admin_messages(client, client.post(step_url(v2, "backfill")))
    run = v2.runs.get()
    assert shown == [f"Backfill run {run.pk} of {TARGET}@v2: 1 batch sent to queue "
                     f"'{get_config().queue}'; progress below."]
    deadline = time.monotonic() + 120
    while run.status == BackfillRun.Status.RUNNING and time.monotonic() < deadline:
        time.sleep(0.5)
        run.refresh_from_db()
    v2.refresh_from_db()
    assert (run.status, run.batches_total, run.rows_processed, v2.state) == (
        "done", 1, 12, State.READY)  # the default BATCH_SIZE (128) covers the 12 rows
    assert "embeddings_app.backfill_batch" in worker.log()
    assert v2.events.filter(to_state="backfilling", actor="admin:operator").exists()
    status = client.get(STATUS_URL, {"id": v2.pk}).json()["versions"][str(v2.pk)]
    assert (status["done"], status["total"], status["percent"], status["stale"]) == (12, 12, 100.0, 0)


def test_list_filters_by_target_and_state_and_searches_model_names(operator):
    fifty_versions_across_ten_targets()  # 45 versions: 9 fake targets x 5 states
    EmbeddingVersion.objects.filter(target="fake3.Thing.embedding", version="v2").update(
        model_name="/models/special-mpnet")
    client = login(operator)

    def versions_shown(query: dict[str, str]) -> set[tuple[str, str]]:
        response = client.get(LIST_URL, query)
        assert response.status_code == 200
        return {(v.target, v.version) for v in response.context["cl"].result_list}

    assert versions_shown({"target": "fake1.Thing.embedding"}) == {
        ("fake1.Thing.embedding", f"v{i}") for i in range(5)}
    assert versions_shown({"state": "failed"}) == {
        (f"fake{t}.Thing.embedding", "v3") for t in range(9)}
    assert versions_shown({"q": "special-mpnet"}) == {("fake3.Thing.embedding", "v2")}


def test_progress_samples_stay_few_on_a_long_run(two_versions):
    """The trigger keeps samples at least max(1 s, elapsed / 300) apart: on a run started ten
    hours ago (a 120 s spacing), updates 1.1 s apart add no new sample after the first two, and
    the last sample is always current."""
    _v1, v2 = two_versions
    run = BackfillRun.objects.create(version=v2, batch_size=10, rows_total=10_000)
    now = time.time()
    BackfillRun.objects.filter(pk=run.pk).update(progress_samples=[[now - 36_000, 0],
                                                                   [now - 1_000, 500]])
    for rows in (501, 502, 503, 504):
        BackfillRun.objects.filter(pk=run.pk).update(rows_processed=rows)
        time.sleep(1.1)  # more than the 1 s spacing of a young run
    run.refresh_from_db()
    assert [rows for _, rows in run.progress_samples] == [0, 500, 501, 504]


def test_a_failed_verify_shows_the_same_message_as_the_command(two_versions, operator):
    """v2 has no vector yet: `embeddings verify` exits non-zero, the admin shows the same line."""
    _v1, v2 = two_versions
    with pytest.raises(CommandError) as failed:
        call_command("embeddings", "verify", TARGET, "v2")
    client = login(operator)
    shown = admin_messages(client, client.post(step_url(v2, "verify")))
    assert shown == [str(failed.value)]
    assert shown[0].startswith(f"verify FAILED for {TARGET}@v2: ")
    v2.refresh_from_db()
    assert v2.verify_passed is False  # recorded, as the command records it


@pytest.mark.django_db(transaction=True)  # the build runs concurrently, from another connection
def test_status_endpoint_shows_an_index_build_under_way(two_versions, operator):
    """A writer's open transaction holds CREATE INDEX CONCURRENTLY in its "waiting for writers"
    phase: meanwhile the status endpoint reports the build (from pg_stat_progress_create_index)."""
    import threading

    from django.db import connection as main_connection
    from django.db import transaction

    from embeddings_app import indexes

    v1, _v2 = two_versions
    locked, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            with transaction.atomic():
                # A save: it writes the row and (dual-write) its vectors, in a column of this
                # table or in the version's own table, whichever the index is built on.
                article = Article.objects.order_by("pk").first()
                article.title = "Held open while the index builds"
                article.save()
                locked.set()
                release.wait(60)
        except BaseException as exc:
            errors.append(exc)
        finally:
            main_connection.close()

    def build() -> None:
        try:
            indexes.build(EmbeddingVersion.objects.get(pk=v1.pk))
        except BaseException as exc:
            errors.append(exc)
        finally:
            main_connection.close()

    threads = [threading.Thread(target=writer, daemon=True)]
    threads[0].start()
    assert locked.wait(30)
    threads.append(threading.Thread(target=build, daemon=True))
    threads[1].start()
    client = login(operator)
    seen = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = client.get(STATUS_URL, {"id": v1.pk}).json()["versions"][str(v1.pk)]
        seen.append((status["index"], status["index_phase"]))
        if status["index"] == "building":
            break
        time.sleep(0.2)
    release.set()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    building = seen[-1]
    assert building[0] == "building", seen
    assert "waiting for writers" in building[1], seen
    assert status["running"] is True
    status = client.get(STATUS_URL, {"id": v1.pk}).json()["versions"][str(v1.pk)]
    assert (status["index"], status["running"]) == ("valid", False)


def test_the_list_and_detail_pages_show_a_derived_versions_lineage(operator):
    fake = {"target": "fake.Thing.embedding", "model_alias": "tiny", "revision": "r1",
            "model_name": "/models/tiny-bert", "fingerprint": "f" * 64, "dimensions": 32}
    v1 = EmbeddingVersion.objects.create(version="v1", column="embedding_v1",
                                         hash_column="embedding_v1_source_hash",
                                         state=State.ACTIVE, **fake)
    v3 = EmbeddingVersion.objects.create(version="v3", column="embedding_v3",
                                         hash_column="embedding_v3_source_hash", storage="bit",
                                         derived_from=v1, derivation="bit", **fake)
    client = login(operator)
    listing = html.unescape(client.get(LIST_URL).content.decode())
    assert "v3 <- v1 (bit)" in listing
    detail = html.unescape(client.get(change_url(v3)).content.decode())
    assert "Lineage" in detail and "fake.Thing.embedding@v1" in detail
