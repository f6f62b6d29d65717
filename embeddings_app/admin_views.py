"""The admin's lifecycle steps and JSON status endpoint.

Each step calls the same function the ``embeddings`` management command calls (``lifecycle``,
``backfill``, ``indexes``), so the refusal rules are one code path and an ``EmbeddingError``'s
message is shown as it is, exactly as the command prints it. Views are wrapped by
``AdminSite.admin_view`` (staff login, CSRF, no caching) in ``EmbeddingVersionAdmin.get_urls``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.db import DatabaseError
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, reverse
from django.views import View

from . import (
    backfill,
    capture,
    estimate,
    indexes,
    lifecycle,
    progress,
    registry,
    rollout,
    shadow,
    tasks,
    truncation,
)
from .config import get_config
from .exceptions import EmbeddingError
from .models import BackfillRun, EmbeddingVersion, State, VersionEvent

# Permission (codename on EmbeddingVersion.Meta) by action group.
PERMISSIONS = {"backfill": "run_backfill", "switch": "switch_active", "drop": "drop_version"}


@dataclass(frozen=True)
class Step:
    name: str
    label: str
    group: str  # key of PERMISSIONS
    confirm: bool  # destructive or read-switching: goes through a confirmation page
    panel: str = "lifecycle"  # the section of the version's page that shows its button


STEPS = {step.name: step for step in (
    Step("backfill", "Start backfill", "backfill", confirm=False),
    Step("index", "Build index", "backfill", confirm=False),
    Step("verify", "Verify", "backfill", confirm=False),
    Step("activate", "Activate", "switch", confirm=True),
    Step("rollback", "Roll back", "switch", confirm=True),
    Step("retire", "Retire", "switch", confirm=True),
    Step("drop", "Drop", "drop", confirm=True),
    Step("shadow", "Start shadow reads", "switch", confirm=True, panel="shadow"),
    Step("shadow-off", "Stop shadow reads", "switch", confirm=True, panel="shadow"),
)}

DEFAULT_SHADOW_RATE = "0.1"


def form_number(raw: str | None, kind: type, default: str) -> Any:
    """The form's value as the command's argument parser reads it (``int`` or ``float``); the
    text itself when it is not one, so the library refuses it with its own one-line message."""
    text = (raw if raw is not None else default).strip()
    try:
        return kind(text)
    except ValueError:
        return text


def form_rate(request: HttpRequest) -> Any:
    return form_number(request.POST.get("rate", request.GET.get("rate")), float,
                       DEFAULT_SHADOW_RATE)


def form_percent(request: HttpRequest) -> Any:
    return form_number(request.POST.get("percent", request.GET.get("percent")), int, "100")


def confirms(step: Step, version: EmbeddingVersion) -> bool:
    """Whether ``step`` goes through a confirmation page: a backfill does when it spends money
    (its model is an API), to show the estimate first."""
    if step.confirm:
        return True
    if step.name != "backfill":
        return False
    try:
        return get_config().model(version.model_alias).is_api
    except EmbeddingError:
        return False


def actor(request: HttpRequest) -> str:
    return f"admin:{request.user.get_username()}"[:150]


def can(request: HttpRequest, step: Step) -> bool:
    return request.user.has_perm(f"embeddings_app.{PERMISSIONS[step.group]}")


class StepFailed(Exception):
    """A step ran but its verdict is negative (a failed verify): shown as an error, like the
    command's non-zero exit."""


# --- the steps: each the same call as `manage.py embeddings <step>` -----------------------------
def _record(version: EmbeddingVersion) -> EmbeddingVersion:
    # The command's own lookup: an unknown target or version is refused with the same message.
    return EmbeddingVersion.objects.get_version(registry.get(version.target).target, version.version)


def run_step(step: Step, version: EmbeddingVersion, request: HttpRequest) -> list[str]:
    """Run ``step``; returns the success and warning lines. Raises ``EmbeddingError`` if refused,
    ``StepFailed`` if it ran with a negative verdict."""
    who = actor(request)
    target, name = version.target, version.version
    if step.name == "backfill":
        record = _record(version)
        run, ranges = backfill.start(record, mode="celery", actor=who)
        tasks.dispatch(run, ranges)
        batches = f"{len(ranges)} batch" + ("" if len(ranges) == 1 else "es")
        return [f"Backfill run {run.pk} of {record}: {batches} sent to queue "
                f"'{get_config().queue}'; progress below."]
    if step.name == "index":
        # On a worker, like the backfill: a large build takes hours (docs/cutover.md, "Large
        # indexes"). The state is checked here, the rest of the refusals by the task.
        record = _record(version)
        indexes.check_buildable(record)
        queue = get_config().queue
        tasks.build_index.apply_async(args=[record.pk, who], queue=queue)
        VersionEvent.objects.create(version=record, from_state=record.state,
                                    to_state=record.state, actor=who,
                                    note=f"index build sent to queue '{queue}'")
        return [f"Index build of {record} sent to queue '{queue}'; its progress shows below "
                "and its result in the history."]
    if step.name == "verify":
        report = lifecycle.verify(registry.get(target).target, name, actor=who)
        if not report.passed:
            raise StepFailed(report.summary())
        return [report.summary()]
    if step.name == "activate":
        percent = form_percent(request)
        warnings = lifecycle.activate(target, name, actor=who, percent=percent)
        if percent < 100:  # as `embeddings activate --percent` says it
            return [*warnings, f"{target}: {name} now serves {percent}% of the searches (sticky "
                    f"per search(key=...)); activate {name} at 100% to complete the flip, roll "
                    "back to end it at once."]
        return [*warnings, f"{target}: reads now use version {name}."]
    if step.name == "shadow":
        record = shadow.start(registry.get(target).target, name, form_rate(request), actor=who)
        return [f"{record}: shadow reads at {record.shadow_rate:.0%} of {target}'s plain "
                "searches, answered on workers off the request path; they end at activate, "
                "rollback, retire or drop."]
    if step.name == "shadow-off":
        stopped = shadow.stop(registry.get(target).target, actor=who)
        names = ", ".join(v.version for v in stopped) or "none was on"
        return [f"{target}: shadow reads off ({names})."]
    if step.name == "rollback":
        previous = lifecycle.rollback(target, actor=who)
        return [f"{target}: rolled back; reads now use version {previous.version}."]
    if step.name == "retire":
        retired = lifecycle.retire(target, name, actor=who)
        warning = lifecycle.retire_warning(retired)
        return [f"{target}@{name} retired: no longer written.", *([warning] if warning else [])]
    if step.name == "drop":
        # As `embeddings drop` does: the refusal rules first (the grace period after the version
        # was last active is only waived when the confirmation page's box is ticked, like --yes).
        record = _record(version)
        lifecycle.check_droppable(record, yes=request.POST.get("yes") == "on")
        where = record.store.describe_storage()
        dropped = lifecycle.drop(target, name, actor=who, yes=True)
        return [f"{target}@{name} dropped: {where}"
                + (f" and index {', '.join(dropped)}" if dropped else "") + " removed."]
    raise Http404(step.name)


def consequences(step: Step, version: EmbeddingVersion) -> list[str]:
    """What the step will do, sentence by sentence, for its confirmation page."""
    versions = list(EmbeddingVersion.objects.for_target(version.target))
    active = next((v for v in versions if v.state == State.ACTIVE), None)
    if step.name == "activate":
        lines = [f"Reads of {version.target} switch to {version} ({version.model_label}, "
                 f"{version.dimensions} dimensions, {_where(version)}): every search embeds "
                 "its query with this model from then on, atomically (at 100%).",
                 "Below 100% (a ready version only), a gradual rollout instead: the version "
                 "serves that share of the searches beside the active one, sticky per "
                 "search(key=...), and Roll back ends it at once."]
        if version.rollout_percent:
            lines.append(f"{version} serves {version.rollout_percent}% of the searches now.")
        if active is None:
            lines.append(f"{version.target} has no active version now.")
        elif active.pk != version.pk:
            lines.append(f"{active} ({active.model_label}) becomes standby: still written on every "
                         "save, the target of a rollback.")
        problems = getattr(lifecycle, "activation_problems", None)
        if version.state not in lifecycle.ACTIVATABLE_STATES:
            lines.append(f"It will be refused: {version} is {version.state}, and only a ready "
                         "(or standby) version can be activated. Nothing will change.")
        elif problems is not None and (found := problems(version)):
            # The activation's own checks, run now: what the refusal will say.
            lines.append("It will be refused, and nothing will change: " + " ".join(found))
        else:
            lines.append("Its activation checks pass now; they run again, atomically, when you "
                         "confirm, and if one fails nothing changes.")
        return lines
    if step.name == "rollback":
        rolling = next((v for v in versions if v.rollout_percent), None)
        if rolling is not None:
            return [f"The gradual rollout of {rolling} ({rolling.rollout_percent}% of the "
                    f"searches) ends at once: {active} serves every search of "
                    f"{version.target} again, in every process within ACTIVE_CACHE_TTL.",
                    f"{rolling} stays ready; it counts as deactivated now (drop's grace "
                    "period applies)."]
        standby = max((v for v in versions if v.state == State.STANDBY),
                      key=lambda v: (v.deactivated_at is not None, v.deactivated_at, v.pk),
                      default=None)
        if standby is None:
            return [f"{version.target} has no standby version: the rollback will be refused and "
                    "nothing will change."]
        return [f"Reads of {version.target} switch back to {standby} ({standby.model_label}), "
                "the most recently active version kept fresh.",
                f"{active} becomes standby." if active else f"{version.target} has no active "
                "version now."]
    if step.name == "shadow":
        lines = [f"The share of the plain searches of {version.target} given below is also "
                 f"answered by "
                 f"{version} on the workers of the embeddings queue, off the request path, and "
                 "compared with the served answer (overlap@k, rank correlation, latency); no "
                 "query text is stored.",
                 "Shadow reads of another version of the target stop; they all end at "
                 "activate, rollback, retire or drop."]
        if version.state not in shadow.SHADOWABLE_STATES:
            lines.append(f"It will be refused: {version} is {version.state}, and only a ready "
                         "or standby version can be shadowed. Nothing will change.")
        return lines
    if step.name == "shadow-off":
        shadowed = [v for v in versions if v.shadow_rate]
        if not shadowed:
            return [f"No version of {version.target} is shadowed now: nothing will change."]
        return [f"Shadow reads of {', '.join(str(v) for v in shadowed)} stop; the recorded "
                "hourly figures stay."]
    if step.name == "backfill":
        try:
            found = estimate.for_backfill(version)
        except EmbeddingError as exc:
            return [f"No estimate: {exc}"]
        return [f"Embeds every missing or stale row of {version} with {version.model_label} on "
                "the workers of the embeddings queue.", *found.lines()]
    if step.name == "retire":
        return [f"{version} stops being written on every save: it can no longer be activated "
                "or rolled back to.",
                f"Its vectors ({_where(version)}) stay until it is dropped.",
                *filter(None, [lifecycle.retire_warning(version)])]
    if step.name == "drop":
        try:
            store = version.store
            what, index_names = store.describe_storage(), store.indexes()
        except EmbeddingError:
            what, index_names = f"the storage of {version} (unknown target)", []
        return [f"Drops {what}"
                + (f" and index {', '.join(index_names)}" if index_names else "")
                + " for good: the vectors are deleted and cannot be restored.",
                f"The row of {version} stays as history, in state dropped.",
                "Refused unless the version is retired; nothing changes if refused."]
    return []


def _where(version: EmbeddingVersion) -> str:
    """Where the version's vectors are, for the confirmation pages."""
    try:
        return version.store.describe()
    except EmbeddingError:
        return f"{version.layout} layout (unknown target)"


class AdminView(View):
    model_admin: Any = None

    def version(self, request: HttpRequest, object_id: str) -> EmbeddingVersion:
        if not self.model_admin.has_view_permission(request):
            raise PermissionDenied
        if not object_id.isdigit():  # a malformed URL is a 404, never a server error
            raise Http404(f"No embedding version {object_id!r}")
        return get_object_or_404(EmbeddingVersion, pk=object_id)


class LifecycleView(AdminView):
    """GET: the confirmation page (or back to the version); POST: run the step."""

    def get(self, request: HttpRequest, object_id: str, step: str) -> HttpResponse:
        version, found = self._prepare(request, object_id, step)
        if not confirms(found, version):
            return HttpResponseRedirect(self._change_url(version))
        return self._confirm_page(request, version, found)

    def post(self, request: HttpRequest, object_id: str, step: str) -> HttpResponse:
        version, found = self._prepare(request, object_id, step)
        if confirms(found, version) and request.POST.get("confirm") != "yes":
            return self._confirm_page(request, version, found)
        try:
            lines = run_step(found, version, request)
        except (EmbeddingError, StepFailed) as exc:
            messages.error(request, str(exc))
        except DatabaseError as exc:
            refusal = lifecycle.dropped_meanwhile(exc)
            if refusal is None:
                raise
            messages.error(request, str(refusal))
        else:
            for line in lines:
                messages.success(request, line)
        return HttpResponseRedirect(self._change_url(version))

    def _prepare(self, request: HttpRequest, object_id: str, step: str) -> tuple[EmbeddingVersion, Step]:
        version = self.version(request, object_id)
        found = STEPS.get(step)
        if found is None:
            raise Http404(f"No step {step!r}")
        if not can(request, found):
            raise PermissionDenied(f"needs embeddings_app.{PERMISSIONS[found.group]}")
        return version, found

    def _change_url(self, version: EmbeddingVersion) -> str:
        opts = self.model_admin.opts
        return reverse(f"{self.model_admin.admin_site.name}:{opts.app_label}_{opts.model_name}_change",
                       args=[version.pk])

    def _confirm_page(self, request: HttpRequest, version: EmbeddingVersion, step: Step) -> HttpResponse:
        context = {
            **self.model_admin.admin_site.each_context(request),
            "opts": self.model_admin.opts,
            "original": version,
            "step": step,
            "title": f"{step.label} {version}?",
            "consequences": consequences(step, version),
            "offers_yes": step.name == "drop",
            "ev_rate": form_rate(request) if step.name == "shadow" else None,
            "ev_percent": form_percent(request) if step.name == "activate" else None,
            "change_url": self._change_url(version),
        }
        return TemplateResponse(
            request, "admin/embeddings_app/embeddingversion/confirm_step.html", context)


class StatusView(AdminView):
    """``?id=1&id=2``: the status of those versions; ``&chart=ID``: that version's chart too."""

    MAX_IDS = 500

    def get(self, request: HttpRequest) -> JsonResponse:
        if not self.model_admin.has_view_permission(request):
            raise PermissionDenied
        try:
            ids = [int(value) for value in request.GET.getlist("id")][: self.MAX_IDS]
            chart_id = int(request.GET["chart"]) if request.GET.get("chart") else None
        except ValueError:
            return JsonResponse({"error": "ids must be integers"}, status=400)
        versions = list(EmbeddingVersion.objects.filter(pk__in=ids))
        found = progress.statuses(versions)
        queues = change_queue_labels(versions)  # the list's "change queue" cells, per target
        data: dict[str, Any] = {"versions": {
            version.pk: {**found[version.pk].as_json(), "change_queue": queues.get(version.target, "")}
            for version in versions}}
        if chart_id is not None:
            run = BackfillRun.objects.filter(version_id=chart_id).first()
            data["chart"] = progress.chart_svg(run)
        return JsonResponse(data)


def change_queue_labels(versions: list[EmbeddingVersion]) -> dict[str, str]:
    """target -> its change queue's depth and lag in a few words, once per declared target."""
    targets = {version.target for version in versions} & set(registry.all_targets())
    return {target: capture.queue_label(registry.get(target)) for target in targets}


# --- the detail page's extra sections -----------------------------------------------------------
def row_admin_url(admin_site: Any, version: EmbeddingVersion, row_key: str) -> str | None:
    """The admin page of the failed row, where its model is registered in this admin site."""
    try:
        model = registry.get(version.target).model
    except EmbeddingError:
        return None
    if not admin_site.is_registered(model):
        return None
    try:
        return reverse(f"{admin_site.name}:{model._meta.app_label}_{model._meta.model_name}_change",
                       args=[row_key])
    except NoReverseMatch:
        return None


def detail_context(request: HttpRequest, version: EmbeddingVersion, admin_site: Any) -> dict[str, Any]:
    runs = list(version.runs.all()[:20])
    readiness = None
    if version.state != State.DROPPED:
        try:
            # Exact live figures of this one version (one scan of its table, on this page only).
            readiness = lifecycle.readiness(version)
        except EmbeddingError:
            readiness = None
    failures = [(failure, row_admin_url(admin_site, version, failure.row_key))
                for failure in version.failures.select_related("run")[:200]]
    steps = [{"step": step, "allowed": can(request, step), "confirm": confirms(step, version)}
             for step in STEPS.values() if step.panel == "lifecycle"]
    buckets = list(version.shadow_buckets.order_by("hour"))
    versions = list(EmbeddingVersion.objects.for_target(version.target))
    return {
        "ev_status": progress.statuses([version])[version.pk],
        "ev_readiness": readiness,
        "ev_events": list(version.events.all()),
        "ev_runs": runs,
        "ev_failures": failures,
        "ev_failure_count": version.failures.count(),
        "ev_chart": progress.chart_svg(runs[0] if runs else None),
        "ev_steps": steps,
        "ev_can_steer": any(item["allowed"] for item in steps),
        "ev_truncation": truncation_text(version),
        "ev_shadow": shadow.summary(version),
        "ev_shadow_chart": progress.shadow_chart_svg(buckets),
        "ev_shadow_allowed": can(request, STEPS["shadow"]),
        "ev_shadow_rate": f"{version.shadow_rate:g}" if version.shadow_rate
        else DEFAULT_SHADOW_RATE,
        "ev_shadowed": [v for v in versions if v.shadow_rate],
        "ev_rollout": next((v for v in versions if v.rollout_percent), None),
        "ev_active": next((v for v in versions if v.state == State.ACTIVE), None),
        "ev_reads": reads_rows(version.target),
    }


def reads_rows(target: str, hours: int = 24) -> list[dict[str, Any]]:
    """The reads per version of ``target`` (``rollout.reads``) with their share, for the page."""
    found = rollout.reads(target, hours)
    total = sum(count for _, count, _ in found) or 1
    return [{"version": name, "reads": count, "share": 100 * count / total,
             "mean_ms": seconds * 1000} for name, count, seconds in found]


def truncation_text(version: EmbeddingVersion) -> str:
    """The version's last truncation figure in a sentence, with where and when it was measured
    (stored by add, verify and compare: nothing is tokenized for the admin)."""
    figure = truncation.stored(version)
    if figure is None:
        return "not measured yet: verify or compare measures it with the model's tokenizer"
    return (f"{figure.summary()} (measured by {figure.when()}"
            + (f", counted with {figure.counted_with})" if figure.counted_with else ")"))
