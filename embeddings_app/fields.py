"""``VersionedEmbedding``: declares that a model's rows are embedded, one store per version.

It is not a database field: it adds no column (each version's column or table is added by
``embeddings add``) and no plain query of the model ever loads a vector.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from asgiref.sync import sync_to_async
from django.db import models

from . import registry
from .exceptions import ConfigurationError

if TYPE_CHECKING:
    from .models import EmbeddingVersion

Source = Sequence[str] | Callable[[Any], str]

SOURCE_SEPARATOR = "\n\n"


class VersionedEmbedding:
    """``embedding = VersionedEmbedding(source=["title", "body"])`` or ``source=callable``."""

    def __init__(self, source: Source) -> None:
        if callable(source):
            self.source_fields: tuple[str, ...] | None = None
            self._source_callable: Callable[[Any], str] | None = source
        elif isinstance(source, (list, tuple)) and source and all(
            isinstance(name, str) for name in source
        ):
            self.source_fields = tuple(source)
            self._source_callable = None
        else:
            raise ConfigurationError(
                "VersionedEmbedding(source=...) takes a non-empty list of field names "
                "or a callable(instance) -> str."
            )
        self.model: type[models.Model] = None  # type: ignore[assignment]  # set by Django
        self.name = ""

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

    @property
    def target(self) -> str:
        return f"{self.model._meta.label}.{self.name}"

    @property
    def table(self) -> str:
        return self.model._meta.db_table

    # --- source text --------------------------------------------------------------------
    def source_text(self, instance: Any) -> str:
        """The text embedded for ``instance``: the callable's result, or the source fields joined."""
        if self._source_callable is not None:
            value = self._source_callable(instance)
            return "" if value is None else str(value)
        assert self.source_fields is not None
        parts = [getattr(instance, name) for name in self.source_fields]
        return SOURCE_SEPARATOR.join(str(part) for part in parts if part not in (None, ""))

    @staticmethod
    def source_hash(text: str) -> bytes:
        """16 bytes that change whenever the source text changes (stored per row and version)."""
        return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def source_queryset(self) -> models.QuerySet:
        """Rows with just what ``source_text`` needs loaded."""
        queryset = self.model._base_manager.all()
        if self.source_fields is not None:
            queryset = queryset.only(*self.source_fields)
        return queryset

    # --- class-level API ----------------------------------------------------------------
    def active(self) -> EmbeddingVersion:
        from .models import EmbeddingVersion

        return EmbeddingVersion.objects.active_for(self.target)

    def search(self, text: str, k: int = 10, queryset: models.QuerySet | None = None) -> list[Any]:
        from . import search

        return search.search(self, text, k=k, queryset=queryset)

    def search_vector(
        self, vector: Any, version: str | None = None, k: int = 10,
        queryset: models.QuerySet | None = None,
    ) -> list[Any]:
        from . import search

        return search.search_vector(self, vector, version=version, k=k, queryset=queryset)

    async def asearch(self, text: str, k: int = 10,
                      queryset: models.QuerySet | None = None) -> list[Any]:
        """``search`` for async code (ASGI views): the same snapshot guarantee (search.py)."""
        from . import search

        return await search.asearch(self, text, k=k, queryset=queryset)

    async def asearch_vector(
        self, vector: Any, version: str | None = None, k: int = 10,
        queryset: models.QuerySet | None = None,
    ) -> list[Any]:
        """``search_vector`` for async code."""
        from . import search

        return await search.asearch_vector(self, vector, version=version, k=k, queryset=queryset)

    def sync(self, queryset: models.QuerySet | None = None) -> int:
        """Re-embed the rows of ``queryset`` (all rows if None) whose source changed behind the
        app's back (``bulk_update``, ``QuerySet.update()``, raw SQL). Returns rows re-embedded."""
        from . import sync

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
        from .models import EmbeddingVersion

        versions = EmbeddingVersion.objects
        record = (versions.active_for(self.field.target) if version is None
                  else versions.get_version(self.field.target, version))
        return record.store.read_vector(self.instance.pk)

    async def avector(self, version: str | None = None) -> np.ndarray | None:
        """``vector`` for async code: the version record and the read in one sync call."""
        return await sync_to_async(self.vector, thread_sensitive=True)(version)
