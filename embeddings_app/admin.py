"""Django admin: every version with its state and coverage (read-only records)."""

from __future__ import annotations

from django.contrib import admin

from .models import BackfillRun, EmbeddingVersion, VersionEvent


class VersionEventInline(admin.TabularInline):
    model = VersionEvent
    extra = 0
    can_delete = False
    readonly_fields = ("at", "from_state", "to_state", "actor", "note")

    def has_add_permission(self, request, obj=None) -> bool:  # type: ignore[no-untyped-def]
        return False


class BackfillRunInline(admin.TabularInline):
    model = BackfillRun
    extra = 0
    can_delete = False
    fields = ("started_at", "finished_at", "status", "mode", "rows_total", "rows_processed",
              "rows_embedded", "rows_skipped", "rows_failed", "last_error")
    readonly_fields = fields

    def has_add_permission(self, request, obj=None) -> bool:  # type: ignore[no-untyped-def]
        return False


@admin.register(EmbeddingVersion)
class EmbeddingVersionAdmin(admin.ModelAdmin):
    list_display = ("target", "version", "model_alias", "revision", "dimensions", "storage",
                    "state", "state_changed_at")
    list_filter = ("target", "state")
    search_fields = ("model_name", "model_alias", "version", "target")
    readonly_fields = [field.name for field in EmbeddingVersion._meta.fields]
    inlines = [VersionEventInline, BackfillRunInline]

    def has_add_permission(self, request) -> bool:  # type: ignore[no-untyped-def]
        return False  # versions are added with `manage.py embeddings add`
