"""Shadow reads and the gradual rollout in the admin (issue 16), through Django's test client.

Invariants checked here: the admin's shadow and rollout steps are the command's functions
(``shadow.start``/``stop``, ``lifecycle.activate(percent=...)``, ``lifecycle.rollback``) behind
``switch_active``, a CSRF-checked POST and a confirmation page; a refusal shows the command's
line and changes nothing; the shadow chart has one bar and one point per hourly ``ShadowBucket``
with that bucket's figures; the page shows the rollout's share and the reads per version.
Buckets are made by ``shadow.record`` in this process (what the worker runs), no worker needed.
"""

from __future__ import annotations

import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse

from embeddings_app import backfill, lifecycle, progress, rollout, shadow
from embeddings_app.exceptions import Refused
from embeddings_app.models import EmbeddingVersion, ShadowBucket, State, VersionEvent
from project.news.models import Article
from tests.conftest import TARGET
from tests.test_admin import OPERATOR_PERMS, admin_messages, change_url, login, make_user, step_url

K = 5
QUERIES = ["economy and interest rates", "football transfer news", "mobile phone technology",
           "election campaign promises", "film awards ceremony", "oil prices rise"]
LIST_URL = reverse("admin:embeddings_app_embeddingversion_changelist")
SVG = "{http://www.w3.org/2000/svg}"


def add_and_backfill(*names_and_aliases: tuple[str, str]) -> list[EmbeddingVersion]:
    versions = []
    for name, alias in names_and_aliases:
        call_command("embeddings", "add", TARGET, name, "--model", alias)
        version = EmbeddingVersion.objects.get_version(TARGET, name)
        run, ranges = backfill.start(version, batch_size=20, mode="inline")
        backfill.run_inline(run, ranges)
        versions.append(EmbeddingVersion.objects.get(pk=version.pk))
    return versions


@pytest.fixture
def v1_active_v2_ready(make_articles: Callable[[int], list]) -> tuple[EmbeddingVersion, ...]:
    """12 real articles; v1 (tiny) switched on directly, v2 (tiny_other) backfilled: ready."""
    make_articles(12)
    v1, v2 = add_and_backfill(("v1", "tiny"), ("v2", "tiny_other"))
    lifecycle.transition(v1, State.ACTIVE, actor="test")
    assert v2.state == State.READY
    return v1, v2


@pytest.fixture
def operator() -> User:
    return make_user("operator", staff=True, codenames=OPERATOR_PERMS)


def shadow_records() -> list:
    """Everything a shadow step could change."""
    return [list(EmbeddingVersion.objects.order_by("pk").values_list("pk", "state", "shadow_rate",
                                                                       "rollout_percent")),
            VersionEvent.objects.count(), ShadowBucket.objects.count()]


def page_text(client: Client, url: str) -> str:
    response = client.get(url)
    assert response.status_code == 200
    return html.unescape(response.content.decode())


def shadow_chart(page: str) -> ET.Element:
    found = re.search(r'<div id="ev-shadow-chart">(.*?)</div>', page, re.S)
    assert found, "no shadow chart section"
    return ET.fromstring(found.group(1).strip())  # well-formed SVG, or this raises


def record_queries(version: EmbeddingVersion, texts: list[str]) -> None:
    """What the worker does for each shadowed search: answer it with the candidate, compare."""
    for text in texts:
        served = [str(obj.pk) for obj in Article.embedding.search(text, k=K)]
        assert shadow.record(version.pk, text, K, served, 0.01) is not None


# --- shadow reads ------------------------------------------------------------------------------
@pytest.mark.django_db
def test_an_operator_starts_and_stops_shadow_reads_from_the_version_page_after_a_confirmation(
        v1_active_v2_ready, operator):
    _v1, v2 = v1_active_v2_ready
    client = login(operator)
    page = page_text(client, change_url(v2))
    assert f"<p id=\"ev-shadow-summary\">{TARGET}@v2: shadow off, no shadow queries recorded " \
           "yet</p>" in page
    assert "No shadow queries recorded yet" in page  # the chart's empty state
    assert re.search(r'id="ev-shadow-rate" value="0.1"', page)
    assert 'id="ev-step-shadow-off"' not in page  # nothing to stop

    before = shadow_records()
    confirm = page_text(client, step_url(v2, "shadow") + "?rate=0.25")
    assert f"also answered by {TARGET}@v2 on the workers" in confirm
    assert re.search(r'name="rate" id="ev-rate" value="0.25"', confirm)
    assert client.post(step_url(v2, "shadow"), {"rate": "0.25"}).status_code == 200  # no confirm
    assert shadow_records() == before

    shown = admin_messages(client, client.post(step_url(v2, "shadow"),
                                               {"rate": "0.25", "confirm": "yes"}))
    assert shown == [f"{TARGET}@v2: shadow reads at 25% of {TARGET}'s plain searches, answered "
                     "on workers off the request path; they end at activate, rollback, retire "
                     "or drop."]
    v2.refresh_from_db()
    assert v2.shadow_rate == 0.25
    assert v2.events.filter(actor="admin:operator", note__startswith="shadow reads at").exists()
    page = page_text(client, change_url(v2))
    assert f"{TARGET}@v2: shadow at 25%, no shadow queries recorded yet" in page
    assert 'id="ev-step-shadow-off"' in page
    assert re.search(r"<td[^>]*><span class=\"ev-nowrap\">shadow 25%</span></td>",
                     page_text(client, LIST_URL))

    assert "Shadow reads of news.Article.embedding@v2 stop" in page_text(
        client, step_url(v2, "shadow-off"))
    shown = admin_messages(client, client.post(step_url(v2, "shadow-off"), {"confirm": "yes"}))
    assert shown == [f"{TARGET}: shadow reads off (v2)."]
    v2.refresh_from_db()
    assert v2.shadow_rate == 0.0


@pytest.mark.django_db
def test_a_refused_rate_or_version_shows_the_commands_line_and_changes_nothing(
        v1_active_v2_ready, operator):
    """The command adds its flag (`` [--rate]``) to a refusal about the rate; the admin shows the
    library's line, which the command's begins with."""
    v1, v2 = v1_active_v2_ready
    client = login(operator)
    before = shadow_records()
    for rate in ("0", "1.5", "nan"):
        with pytest.raises(CommandError) as refused:
            call_command("embeddings", "shadow", TARGET, "v2", "--rate", rate)
        shown = admin_messages(client, client.post(step_url(v2, "shadow"),
                                                   {"rate": rate, "confirm": "yes"}))
        assert [f"{shown[0]} [--rate]"] == [str(refused.value)], rate
    with pytest.raises(Refused) as refused_text:  # not a number at all: the library's line
        shadow.start(TARGET, "v2", "a tenth")  # type: ignore[arg-type]
    assert admin_messages(client, client.post(step_url(v2, "shadow"), {
        "rate": "a tenth", "confirm": "yes"})) == [str(refused_text.value)]
    with pytest.raises(CommandError) as refused:
        call_command("embeddings", "shadow", TARGET, "v1", "--rate", "0.1")
    assert "v1 is active; only a ready or standby version" in str(refused.value)
    assert "It will be refused" in page_text(client, step_url(v1, "shadow"))
    assert admin_messages(client, client.post(step_url(v1, "shadow"), {
        "rate": "0.1", "confirm": "yes"})) == [str(refused.value)]
    assert shadow_records() == before


@pytest.mark.django_db
def test_shadow_steps_need_switch_active_and_a_csrf_token(v1_active_v2_ready, operator):
    _v1, v2 = v1_active_v2_ready
    shadow.start(TARGET, "v2", 0.5)  # so that "stop" would change something
    before = shadow_records()
    viewer = make_user("viewer", staff=True, codenames=("view_embeddingversion",))
    backfiller = make_user("backfiller", staff=True,
                           codenames=("view_embeddingversion", "run_backfill"))
    for user in (viewer, backfiller):
        client = login(user)
        page = page_text(client, change_url(v2))
        assert "shadow at 50%" in page  # the summary is shown read-only
        assert 'id="ev-step-shadow' not in page, user
        for step in ("shadow", "shadow-off"):
            assert client.get(step_url(v2, step)).status_code == 403, (user, step)
            assert client.post(step_url(v2, step), {"rate": "0.2", "confirm": "yes"}
                               ).status_code == 403, (user, step)
    assert shadow_records() == before

    client = login(operator, enforce_csrf_checks=True)
    for step in ("shadow", "shadow-off"):
        response = client.post(step_url(v2, step), {"rate": "0.2", "confirm": "yes"})
        assert response.status_code == 403 and b"CSRF" in response.content, step
    assert shadow_records() == before
    confirm = client.get(step_url(v2, "shadow") + "?rate=0.2").content.decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', confirm).group(1)
    response = client.post(step_url(v2, "shadow"), {"rate": "0.2", "confirm": "yes",
                                                    "csrfmiddlewaretoken": token})
    assert response.status_code == 302
    assert EmbeddingVersion.objects.get(pk=v2.pk).shadow_rate == 0.2


@pytest.mark.django_db
def test_the_shadow_chart_has_one_bar_and_one_point_per_hourly_bucket_with_its_figures(
        v1_active_v2_ready, operator):
    """Three buckets, 3 h, 1 h and 0 h old (recorded now, then moved back an hour at a time),
    with 2, 3 and 1 queries: the SVG's bars and points carry those buckets' queries and mean
    overlap@k, spaced by their hours, and the summary line is ``shadow.summary``'s."""
    _v1, v2 = v1_active_v2_ready
    v2 = shadow.start(TARGET, "v2", 1.0)
    for texts, back in ((QUERIES[:2], 3), (QUERIES[2:5], 1), (QUERIES[5:], 0)):
        record_queries(v2, texts)
        if back:
            ShadowBucket.objects.filter(version=v2, hour__gte=shadow_hour()).update(
                hour=shadow_hour() - timedelta(hours=back))
    buckets = list(ShadowBucket.objects.filter(version=v2).order_by("hour"))
    assert [b.queries for b in buckets] == [2, 3, 1]

    page = page_text(login(operator), change_url(v2))
    assert f'<p id="ev-shadow-summary">{shadow.summary(v2).line()}</p>' in page
    assert ", 6 queries, overlap@k " in shadow.summary(v2).line()
    svg = shadow_chart(page)
    assert svg.get("data-points") == "3"
    bars = svg.findall(f"{SVG}rect")
    points = svg.findall(f"{SVG}circle")
    assert len(bars) == len(points) == 3
    for bucket, bar, point in zip(buckets, bars, points, strict=True):
        hour = f"{bucket.hour:%Y-%m-%d %H:00} UTC"
        mean = bucket.overlap_sum / bucket.queries
        assert bar.findtext(f"{SVG}title") == f"{hour}: {bucket.queries} queries"
        assert point.findtext(f"{SVG}title") == (
            f"{hour}: mean overlap@k {mean:.3f} over {bucket.queries} queries")
        assert float(point.get("data-overlap")) == pytest.approx(mean, abs=1e-6)
        plot_h = progress.SHADOW_H - progress.SHADOW_PAD_T - progress.SHADOW_PAD_B
        assert float(point.get("cy")) == pytest.approx(
            progress.SHADOW_PAD_T + plot_h * (1 - mean), abs=0.06)
        assert float(bar.get("height")) == pytest.approx(plot_h * bucket.queries / 3, abs=0.06)
    xs = [float(point.get("cx")) for point in points]
    assert xs[1] - xs[0] == pytest.approx(2 * (xs[2] - xs[1]), abs=0.2)  # 2 h gap, then 1 h
    labels = [text.text for text in svg.iter(f"{SVG}text")]
    assert {"mean overlap@k", "queries per hour"} <= set(labels)
    assert any(label and label.startswith("hour (UTC)") for label in labels)
    assert "<script" not in page.split('id="ev-shadow-chart"')[1].split("</div>")[0]


def shadow_hour():  # type: ignore[no-untyped-def]
    from django.utils import timezone

    return timezone.now().replace(minute=0, second=0, microsecond=0)


# --- the gradual rollout -------------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)  # the index is built concurrently
def test_a_rollout_at_30_percent_from_the_admin_shows_its_share_and_reads_and_a_rollback_ends_it(
        make_articles, operator, settings):
    settings.EMBEDDINGS = {**settings.EMBEDDINGS, "ACTIVE_CACHE_TTL": 0}
    make_articles(12)
    v1, v2 = add_and_backfill(("v1", "tiny"), ("v2", "tiny_other"))
    call_command("embeddings", "activate", TARGET, "v1", "--force")
    call_command("embeddings", "index", TARGET, "v2")
    call_command("embeddings", "verify", TARGET, "v2")
    client = login(operator)

    confirm = page_text(client, step_url(v2, "activate"))
    assert re.search(r'name="percent" id="ev-percent" value="100"', confirm)
    before = shadow_records()
    with pytest.raises(CommandError) as refused:
        call_command("embeddings", "activate", TARGET, "v2", "--percent", "0")
    shown = admin_messages(client, client.post(step_url(v2, "activate"),
                                               {"percent": "0", "confirm": "yes"}))
    assert [f"{shown[0]} [--percent]"] == [str(refused.value)]
    assert shadow_records() == before

    shown = admin_messages(client, client.post(step_url(v2, "activate"),
                                               {"percent": "30", "confirm": "yes"}))
    assert shown[-1].startswith(f"{TARGET}: v2 now serves 30% of the searches")
    v2.refresh_from_db()
    v1.refresh_from_db()
    assert (v2.rollout_percent, v2.state, v1.state) == (30, State.READY, State.ACTIVE)
    assert "rollout 30%" in page_text(client, LIST_URL)
    assert f"{TARGET}@v2 serves <strong>30%</strong> of the searches beside {TARGET}@v1" in (
        page_text(client, change_url(v1)))

    served = {"v1": 0, "v2": 0}
    for key in range(40):
        results = Article.embedding.search(QUERIES[key % len(QUERIES)], k=K, key=f"user-{key}")
        served[results[0].embedding_version] += 1
    rollout.flush()
    assert served["v1"] and served["v2"], served
    page = page_text(client, change_url(v2))
    for name, count, seconds in rollout.reads(TARGET):
        assert count == served[name]
        assert re.search(rf"<td>(<strong>)?{name}(</strong>)?</td><td>{count}</td>"
                         rf"<td>{100 * count / 40:.1f}%</td><td>{seconds * 1000:.1f} ms</td>",
                         page), name
    assert len(rollout.reads(TARGET)) == 2

    confirm = page_text(client, step_url(v2, "rollback"))
    assert f"The gradual rollout of {TARGET}@v2 (30% of the searches) ends at once" in confirm
    shown = admin_messages(client, client.post(step_url(v2, "rollback"), {"confirm": "yes"}))
    assert shown == [f"{TARGET}: rolled back; reads now use version v1."]
    v2.refresh_from_db()
    assert (v2.rollout_percent, v2.state) == (0, State.READY)
    assert EmbeddingVersion.objects.get(pk=v1.pk).state == State.ACTIVE
    assert "rollout 30%" not in page_text(client, LIST_URL)
    assert f"No gradual rollout of {TARGET}: {TARGET}@v1 serves every search." in page_text(
        client, change_url(v2))
