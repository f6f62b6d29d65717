"""Reads: always the active version, its model for the query and its column for the vectors."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from django.db import connection, models, transaction
from django.db.models.expressions import Expression
from pgvector.django import CosineDistance, HalfVectorField, VectorField

from . import active, encoders
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
    version = active.get(field.target)
    # The query vector comes from the same version record as the column searched: one snapshot.
    query_vector = encoders.for_version(version).encode_query(text)
    return _nearest(field, version, query_vector, k, queryset)


def search_vector(field: VersionedEmbedding, vector: Any, *, version: str | None = None,
                  k: int = 10, queryset: models.QuerySet | None = None) -> list[Any]:
    current = active.get(field.target)
    if version is None:
        raise VersionMismatch(
            f"search_vector needs the version the vector was made with; {field.target} "
            f'searches version "{current.version}" ({current.model_label}).'
        )
    if version != current.version:
        raise VersionMismatch(
            f'The vector is of version "{version}" but {field.target} searches version '
            f'"{current.version}"; embed the query with {current.model_label} or use search().'
        )
    array = np.asarray(vector, dtype=np.float32)
    if array.ndim != 1 or array.shape[0] != current.dimensions:
        raise VersionMismatch(
            f"The vector has shape {array.shape} but version \"{current.version}\" stores "
            f"{current.dimensions} dimensions."
        )
    return _nearest(field, current, array, k, queryset)


def _nearest(field: VersionedEmbedding, version: EmbeddingVersion, vector: np.ndarray, k: int,
             queryset: models.QuerySet | None) -> list[Any]:
    if k < 1:
        return []
    filtered = queryset is not None and queryset.query.has_filters()
    queryset = queryset if queryset is not None else field.model._default_manager.all()
    distance = CosineDistance(_vector_column(version), vector)
    with transaction.atomic(using=queryset.db):
        _set_search_parameters(version, filtered=filtered)
        results = list(
            queryset.annotate(distance=distance)
            .filter(distance__isnull=False)  # rows without a vector for this version
            .order_by("distance", "pk")[:k]
        )
    for obj in results:
        obj.embedding_version = version.version
    return results


def _set_search_parameters(version: EmbeddingVersion, *, filtered: bool) -> None:
    """``SET LOCAL`` the HNSW search parameters of ``version`` for this transaction.

    ``hnsw.ef_search`` is the version's ``hnsw_ef_search``. A filtered query (a ``queryset`` with
    a WHERE clause) also turns on pgvector 0.8's iterative index scan in ``strict_order`` mode, so
    a selective filter still returns ``k`` rows, in exact distance order.
    """
    with connection.cursor() as cursor:
        cursor.execute("SELECT set_config('hnsw.ef_search', %s, true)",
                       [str(int(version.hnsw_ef_search))])
        if filtered and supports_iterative_scan():
            cursor.execute("SELECT set_config('hnsw.iterative_scan', 'strict_order', true)")


_extension_version: list[tuple[int, ...]] = []


def pgvector_version() -> tuple[int, ...]:
    if not _extension_version:
        with connection.cursor() as cursor:
            cursor.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            row = cursor.fetchone()
        _extension_version.append(
            tuple(int(part) for part in row[0].split(".") if part.isdigit()) if row else ()
        )
    return _extension_version[0]


def supports_iterative_scan() -> bool:
    return pgvector_version() >= (0, 8)
