"""Dual-write: every save re-embeds the changed row for every version still written."""

from __future__ import annotations

from typing import Any

from django.db import models, transaction
from django.db.models.signals import post_save

from . import registry
from .config import get_config
from .models import EmbeddingVersion


def embed_saved_row(sender: type[models.Model], instance: models.Model, raw: bool = False,
                    update_fields: Any = None, **kwargs: Any) -> None:
    if raw:  # loaddata: the fixture is written as is
        return
    for field in registry.fields_of(sender):
        if (update_fields is not None and field.source_fields is not None
                and not set(update_fields) & set(field.source_fields)):
            continue  # the source was not saved: nothing to re-embed
        mode = get_config().dual_write
        if mode == "sync":
            refresh_saved(field.target, instance)
        elif mode == "on_commit":
            transaction.on_commit(lambda f=field, i=instance: refresh_saved(f.target, i))
        else:
            from .tasks import refresh_rows_task

            transaction.on_commit(
                lambda f=field, pk=instance.pk: refresh_rows_task.apply_async(
                    (f.target, [pk]), queue=get_config().queue
                )
            )


def refresh_saved(target: str, instance: models.Model) -> None:
    from .sync import refresh_rows

    field = registry.get(target)
    versions = list(EmbeddingVersion.objects.for_target(target).written())
    if versions:
        refresh_rows(field, versions, [instance])


def connect() -> None:
    """Listen to the saves of every model that declares a VersionedEmbedding."""
    for target in registry.all_targets():
        model = registry.get(target).model
        post_save.connect(embed_saved_row, sender=model, dispatch_uid=f"embeddings:{target}")
