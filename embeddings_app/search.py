"""Reads: always the active version, its model for the query and its column for the vectors."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from django.db import models
from django.db.models.expressions import Expression
from pgvector.django import CosineDistance, HalfVectorField, VectorField

from . import encoders
from .exceptions import VersionMismatch
from .models import EmbeddingVersion

if TYPE_CHECKING:
    from .fields import VersionedEmbedding


class VersionColumn(Expression):
    """A version's vector column of the queried table (it is not a model field)."""

    def __init__(self, column: str, output_field: models.Field) -> None:
        super().__init__(output_field=output_field)
        self.column = column

    def as_sql(self, compiler: Any, connection: Any) -> tuple[str, list[Any]]:
        alias = compiler.query.get_initial_alias()
        return f"{compiler.quote_name_unless_alias(alias)}.{connection.ops.quote_name(self.column)}", []


def _vector_column(version: EmbeddingVersion) -> VersionColumn:
    field_class = HalfVectorField if version.storage == "halfvec" else VectorField
    return VersionColumn(version.column, field_class(dimensions=version.dimensions))


def search(field: VersionedEmbedding, text: str, *, k: int = 10,
           queryset: models.QuerySet | None = None) -> list[Any]:
    version = EmbeddingVersion.objects.active_for(field.target)
    # The query vector comes from the same version record as the column searched: one snapshot.
    query_vector = encoders.for_version(version).encode_query(text)
    return _nearest(field, version, query_vector, k, queryset)


def search_vector(field: VersionedEmbedding, vector: Any, *, version: str | None = None,
                  k: int = 10, queryset: models.QuerySet | None = None) -> list[Any]:
    active = EmbeddingVersion.objects.active_for(field.target)
    if version is None:
        raise VersionMismatch(
            f"search_vector needs the version the vector was made with; {field.target} "
            f'searches version "{active.version}" ({active.model_label}).'
        )
    if version != active.version:
        raise VersionMismatch(
            f'The vector is of version "{version}" but {field.target} searches version '
            f'"{active.version}"; embed the query with {active.model_label} or use search().'
        )
    array = np.asarray(vector, dtype=np.float32)
    if array.ndim != 1 or array.shape[0] != active.dimensions:
        raise VersionMismatch(
            f"The vector has shape {array.shape} but version \"{active.version}\" stores "
            f"{active.dimensions} dimensions."
        )
    return _nearest(field, active, array, k, queryset)


def _nearest(field: VersionedEmbedding, version: EmbeddingVersion, vector: np.ndarray, k: int,
             queryset: models.QuerySet | None) -> list[Any]:
    if k < 1:
        return []
    queryset = queryset if queryset is not None else field.model._default_manager.all()
    distance = CosineDistance(_vector_column(version), vector)
    results = list(
        queryset.annotate(distance=distance)
        .filter(distance__isnull=False)  # rows without a vector for this version
        .order_by("distance", "pk")[:k]
    )
    for obj in results:
        obj.embedding_version = version.version
    return results
