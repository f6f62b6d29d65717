"""Django admin: watch every embedding version and steer its lifecycle.

The list shows each version's state, coverage, failures and index from the progress records (a
fixed number of queries, see ``progress.py``) and refreshes itself from a small JSON endpoint.
The lifecycle buttons call the very functions the ``embeddings`` command calls (``admin_views.py``)
so every refusal rule, and its message, is the same in both places.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.admin.views.main import ChangeList
from django.http import HttpRequest
from django.urls import URLPattern, path
from django.utils.html import format_html

from . import admin_views, capture, progress, registry, truncation
from .models import EmbeddingVersion, State


class StatusChangeList(ChangeList):
    """Attaches the status of every version of the page to it, computed once for the page."""

    def get_results(self, request: HttpRequest) -> None:
        super().get_results(request)
        versions = list(self.result_list)
        found = progress.statuses(versions)
        queues = admin_views.change_queue_labels(versions)
        for version in versions:
            version.ev_status = found[version.pk]
            version.ev_capture = queues.get(version.target, "")


def _cell(obj: EmbeddingVersion, field: str, text: str, title: str = "") -> str:
    """A cell the status script updates in place (``data-ev-id`` / ``data-ev-field``)."""
    return format_html('<span class="ev-nowrap" data-ev-id="{}" data-ev-field="{}" title="{}">{}</span>',
                       obj.pk, field, title, text)


@admin.register(EmbeddingVersion)
class EmbeddingVersionAdmin(admin.ModelAdmin):
    list_display = ("target", "version", "derived", "model_at_revision", "dims", "storage", "layout_cell",
                    "state_badge", "active_mark", "coverage", "stale_rows", "failures",
                    "index_state", "truncated", "rate_eta", "change_queue", "rollout_share",
                    "last_change")
    list_display_links = ("target", "version")
    list_filter = ("target", "state", "layout")
    search_fields = ("model_name", "model_alias")
    list_per_page = 100
    list_select_related = ("derived_from",)
    actions = None  # lifecycle steps are per version, behind their own permissions
    change_list_template = "admin/embeddings_app/embeddingversion/change_list.html"
    change_form_template = "admin/embeddings_app/embeddingversion/change_form.html"
    fieldsets = (
        (None, {"fields": ("target", "version", "state", "layout", "table", "column",
                           "hash_column", "chunk_tokens", "chunk_overlap")}),
        ("Lineage", {"fields": ("derived_from", "derivation")}),
        ("Pinned model", {"fields": ("model_alias", "model_name", "revision", "fingerprint",
                                     "encode_settings", "dimensions", "storage", "distance")}),
        ("Verification and index", {"fields": ("verified_at", "verify_passed", "verify_report",
                                               "hnsw_m", "hnsw_ef_construction", "hnsw_ef_search")}),
        ("Truncation", {"fields": ("truncation_summary", "truncation")}),
        ("Dates", {"fields": ("created_at", "state_changed_at", "activated_at",
                              "deactivated_at")}),
    )
    readonly_fields = [field.name for field in EmbeddingVersion._meta.fields] + [
        "truncation_summary"]

    class Media:
        css = {"all": ("embeddings_app/admin.css",)}
        js = ("embeddings_app/status.js",)

    # --- permissions: records are never edited or deleted here, only steered ----------------
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # versions are added with `manage.py embeddings add` (loads the model)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # every field is a record; state changes go through the lifecycle buttons

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # a version is dropped (its row stays as history), never deleted

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return super().has_view_permission(request, obj) or any(
            request.user.has_perm(f"embeddings_app.{codename}")
            for codename in admin_views.PERMISSIONS.values()
        )

    # --- list ---------------------------------------------------------------------------------
    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return StatusChangeList

    @admin.display(description="model@revision", ordering="model_name")
    def model_at_revision(self, obj: EmbeddingVersion) -> str:
        return format_html('<span class="ev-model" title="{}">{}</span>', obj.model_name, obj.model_label)

    @admin.display(description="dims", ordering="dimensions")
    def dims(self, obj: EmbeddingVersion) -> int:
        return obj.dimensions

    @admin.display(description="layout", ordering="layout")
    def layout_cell(self, obj: EmbeddingVersion) -> str:
        return obj.layout_label

    @admin.display(description="derived from")
    def derived(self, obj: EmbeddingVersion) -> str:
        """``v3 <- v1 (bit)``: the version this one was derived from (``embeddings derive``)."""
        return obj.lineage

    @admin.display(description="state", ordering="state")
    def state_badge(self, obj: EmbeddingVersion) -> str:
        # Colours per state live in admin.css, so the status script only swaps the class.
        return format_html('<span class="ev-badge ev-state-{}" data-ev-id="{}" data-ev-field="state">'
                           "{}</span>", obj.state, obj.pk, obj.state)

    @admin.display(description="active")
    def active_mark(self, obj: EmbeddingVersion) -> str:
        return _cell(obj, "active", "★" if obj.state == State.ACTIVE else "")

    @admin.display(description="coverage")
    def coverage(self, obj: EmbeddingVersion) -> str:
        status = self._status(obj)
        width = f"{status.percent:.1f}" if status.percent is not None else "0"
        return format_html(
            '<div class="ev-coverage" title="{}"><div class="ev-bar"><div class="ev-bar-fill" '
            'data-ev-id="{}" data-ev-field="bar" style="width:{}%"></div></div>{}</div>',
            status.coverage_note, obj.pk, width,
            _cell(obj, "coverage_label", progress.coverage_label(status.done, status.total,
                                                                 status.percent)))

    @admin.display(description="stale")
    def stale_rows(self, obj: EmbeddingVersion) -> str:
        stale = self._status(obj).stale
        return _cell(obj, "stale", "—" if stale is None else str(stale),
                     title="exact count on the version's page" if stale is None
                     else "kept fresh by dual-write since the last complete backfill")

    @admin.display(description="failures")
    def failures(self, obj: EmbeddingVersion) -> str:
        status = self._status(obj)
        return _cell(obj, "failures", str(status.failures), title=status.last_error or "")

    @admin.display(description="index")
    def index_state(self, obj: EmbeddingVersion) -> str:
        return _cell(obj, "index", _index_label(self._status(obj)))

    @admin.display(description="truncated")
    def truncated(self, obj: EmbeddingVersion) -> str:
        """Sampled rows longer than the model's token limit, as last measured (never counted
        here: add, verify and compare measure it)."""
        return format_html('<span class="ev-nowrap" title="{}">{}</span>',
                           admin_views.truncation_text(obj), truncation.cell(obj))

    @admin.display(description="rows over the token limit")
    def truncation_summary(self, obj: EmbeddingVersion) -> str:
        return admin_views.truncation_text(obj)

    @admin.display(description="rate / ETA")
    def rate_eta(self, obj: EmbeddingVersion) -> str:
        status = self._status(obj)
        return _cell(obj, "rate_label", progress.rate_label(status.rate, status.eta_seconds))

    @admin.display(description="change queue")
    def change_queue(self, obj: EmbeddingVersion) -> str:
        """The target's change capture: rows waiting for the sweep and the oldest one's age."""
        label = getattr(obj, "ev_capture", None)
        if label is None:
            label = capture.queue_label(registry.get(obj.target))
        return _cell(obj, "change_queue", label,
                     title="rows written without a save signal, waiting for the sweep's drain")

    @admin.display(description="rollout / shadow")
    def rollout_share(self, obj: EmbeddingVersion) -> str:
        """The share of the searches the version serves in a gradual rollout, and the share it
        shadows (fields of the row: no query)."""
        parts = []
        if obj.rollout_percent:
            parts.append(f"rollout {obj.rollout_percent}%")
        if obj.shadow_rate:
            parts.append(f"shadow {obj.shadow_rate * 100:g}%")
        return format_html('<span class="ev-nowrap">{}</span>', ", ".join(parts))

    @admin.display(description="last change", ordering="state_changed_at")
    def last_change(self, obj: EmbeddingVersion) -> str:
        return _cell(obj, "last_change", self._status(obj).last_change.replace("T", " "))

    @staticmethod
    def _status(obj: EmbeddingVersion) -> progress.VersionStatus:
        status = getattr(obj, "ev_status", None)
        if status is None:  # rendered outside the change list: compute for this one version
            status = progress.statuses([obj])[obj.pk]
            obj.ev_status = status
        return status

    # --- URLs: the status endpoint and the lifecycle steps -------------------------------------
    def get_urls(self) -> list[URLPattern]:
        prefix = f"{self.opts.app_label}_{self.opts.model_name}"
        wrap = self.admin_site.admin_view  # staff only (else login), CSRF-protected, never cached
        return [
            path("status/", wrap(admin_views.StatusView.as_view(model_admin=self)),
                 name=f"{prefix}_status"),
            path("<path:object_id>/lifecycle/<str:step>/",
                 wrap(admin_views.LifecycleView.as_view(model_admin=self)),
                 name=f"{prefix}_lifecycle"),
            *super().get_urls(),
        ]

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "",
                    extra_context: dict[str, Any] | None = None) -> Any:
        extra = dict(extra_context or {})
        version = self.get_object(request, object_id)
        if version is not None:
            extra.update(admin_views.detail_context(request, version, self.admin_site))
        return super().change_view(request, object_id, form_url, extra_context=extra)


def _index_label(status: progress.VersionStatus) -> str:
    if status.index == "building":
        pct = f" {status.index_percent:.0f}%" if status.index_percent is not None else ""
        return f"building{pct} ({status.index_phase})"
    return status.index
