"""``VersionedEmbedding``: declares that a model's rows are embedded, one store per version.

It is not a database field: it adds no column (each version's column or table is added by
``embeddings add``) and no plain query of the model ever loads a vector. Its source (text, hash,
the queries reading them) is ``sources.EmbeddingSource``'s.

This module imports the app's models: import it from a models module or later (as Django's own
``contenttypes.fields`` does), or import ``VersionedEmbedding`` from ``embeddings_app``, which
loads this module on first use.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from asgiref.sync import sync_to_async
from django.db import models

from . import registry, search, sync
from .models import EmbeddingVersion
from .sources import SOURCE_SEPARATOR, EmbeddingSource, Source

__all__ = ["SOURCE_SEPARATOR", "BoundEmbedding", "Source", "VersionedEmbedding"]


class VersionedEmbedding(EmbeddingSource):
    """``embedding = VersionedEmbedding(source=["title", "body"])`` or ``source=callable``."""

    # --- Django model integration -----------------------------------------------------------
    def contribute_to_class(self, cls: type[models.Model], name: str) -> None:
        self.model = cls
        self.name = name
        setattr(cls, name, self)
        if not cls._meta.abstract:
            registry.register(self)

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return BoundEmbedding(self, instance)

    # --- class-level API ----------------------------------------------------------------
    def active(self) -> EmbeddingVersion:
        return EmbeddingVersion.objects.active_for(self.target)

    def search(self, text: str, k: int = 10, queryset: models.QuerySet | None = None,
               key: Any = None) -> list[Any]:
        """The ``k`` nearest rows; ``key`` (e.g. a user or session id) keeps a caller on one
        version during a gradual rollout (``activate --percent``)."""
        return search.search(self, text, k=k, queryset=queryset, key=key)

    def search_vector(
        self, vector: Any, version: str | None = None, k: int = 10,
        queryset: models.QuerySet | None = None,
    ) -> list[Any]:
        return search.search_vector(self, vector, version=version, k=k, queryset=queryset)

    async def asearch(self, text: str, k: int = 10, queryset: models.QuerySet | None = None,
                      key: Any = None) -> list[Any]:
        """``search`` for async code (ASGI views): the same snapshot guarantee (search.py)."""
        return await search.asearch(self, text, k=k, queryset=queryset, key=key)

    async def asearch_vector(
        self, vector: Any, version: str | None = None, k: int = 10,
        queryset: models.QuerySet | None = None,
    ) -> list[Any]:
        """``search_vector`` for async code."""
        return await search.asearch_vector(self, vector, version=version, k=k, queryset=queryset)

    def sync(self, queryset: models.QuerySet | None = None) -> int:
        """Re-embed the rows of ``queryset`` (all rows if None) whose source changed behind the
        app's back (``bulk_update``, ``QuerySet.update()``, raw SQL). Returns rows re-embedded."""
        return sync.sync_queryset(self, queryset)

    def __repr__(self) -> str:
        return f"<VersionedEmbedding {self.target if self.model else '(unbound)'}>"


class BoundEmbedding:
    """``article.embedding``: the embedding of one row."""

    def __init__(self, field: VersionedEmbedding, instance: Any) -> None:
        self.field = field
        self.instance = instance

    @property
    def text(self) -> str:
        return self.field.source_text(self.instance)

    def vector(self, version: str | None = None) -> np.ndarray | None:
        """This row's stored vector for ``version`` (the active one by default), or None."""
        versions = EmbeddingVersion.objects
        record = (versions.active_for(self.field.target) if version is None
                  else versions.get_version(self.field.target, version))
        return record.store.read_vector(self.instance.pk)

    async def avector(self, version: str | None = None) -> np.ndarray | None:
        """``vector`` for async code: the version record and the read in one sync call."""
        return await sync_to_async(self.vector, thread_sensitive=True)(version)
