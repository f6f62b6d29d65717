"""Dual-write: every save re-embeds the changed row for every version still written.

``EMBEDDINGS["DUAL_WRITE"]`` chooses when (docs/backfill.md):

* ``"sync"``: in ``post_save``, inside the saving transaction; the row is fresh when ``save()``
  returns (the save pays the encode time).
* ``"on_commit"``: in this process right after the saving transaction commits; until then (and if
  the process dies in between) the row is *stale*.
* ``"celery"``: a ``refresh_rows`` task on ``EMBEDDINGS["QUEUE"]`` sent after commit; the row is
  stale until a worker runs it.

A stale row keeps its previous vector and source hash: search still finds it by its previous
text (the vector is never mixed with another version's). ``status`` counts it as stale, and the
sweep task or ``sync()`` refreshes it if the dual-write was lost. A row the encoder rejects is
recorded as a ``RowFailure``; the save itself never fails because of embedding (an embedding API
that cannot answer leaves the row stale, for the sweep).
"""

from __future__ import annotations

import logging
from typing import Any

from django.db import models, transaction
from django.db.models.signals import post_save

from . import registry
from .config import get_config
from .encoders import RETRY_BUDGET
from .exceptions import ProviderError
from .models import EmbeddingVersion
from .sync import record_failures, refresh_rows
from .tasks import refresh_rows_task

logger = logging.getLogger(__name__)
# Seconds a save's dual-write may wait for an embedding API that fails transiently.
SAVE_RETRY_BUDGET = 5.0


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
            transaction.on_commit(
                lambda f=field, pk=instance.pk: refresh_rows_task.apply_async(
                    (f.target, [pk]), queue=get_config().queue
                )
            )


def refresh_saved(target: str, instance: models.Model) -> None:
    field = registry.get(target)
    versions = list(EmbeddingVersion.objects.for_target(target).written())
    if versions:
        budget = RETRY_BUDGET.set(SAVE_RETRY_BUDGET)
        try:
            record_failures(refresh_rows(field, versions, [instance]))
        except ProviderError as exc:
            # An embedding API that cannot answer now: the row stays stale (its previous vector
            # keeps serving) until the sweep or sync() re-embeds it; the save goes through.
            logger.warning("dual-write of %s row %s left stale: %s", target, instance.pk, exc)
        finally:
            RETRY_BUDGET.reset(budget)


def connect() -> None:
    """Listen to the saves of every model that declares a VersionedEmbedding."""
    for target in registry.all_targets():
        model = registry.get(target).model
        post_save.connect(embed_saved_row, sender=model, dispatch_uid=f"embeddings:{target}")
