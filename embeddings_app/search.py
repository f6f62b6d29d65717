"""Reads: always the active version, its model for the query and its column for the vectors."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from django.db import connection, connections, models
from django.db.models.expressions import Expression
from django.db.models.lookups import IsNull
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
    column = _vector_column(version)
    search = (queryset.annotate(distance=CosineDistance(column, vector))
              # Rows without a vector for this version. On the column, not on the distance: the
              # query vector is then sent and computed once per row, as in hand-written SQL.
              .filter(IsNull(column, False))
              .order_by("distance", "pk")[:k])
    db = connections[queryset.db]
    # Inside the caller's transaction: SET LOCAL, gone when it ends. In autocommit: session
    # settings sent only when they differ from what this connection already has, so a steady
    # stream of searches costs one round trip each, like the raw SQL.
    _set_search_parameters(db, version, filtered=filtered, local=db.in_atomic_block)
    results = list(search)
    for obj in results:
        obj.embedding_version = version.version
    return results


def _set_search_parameters(db: Any, version: EmbeddingVersion, *, filtered: bool,
                           local: bool) -> None:
    """Set the HNSW search parameters of ``version`` on ``db``.

    ``hnsw.ef_search`` is the version's ``hnsw_ef_search``. A filtered query (a ``queryset`` with
    a WHERE clause) also turns on pgvector 0.8's iterative index scan in ``strict_order`` mode, so
    a selective filter still returns ``k`` rows, in exact distance order.
    """
    wanted = {"hnsw.ef_search": str(int(version.hnsw_ef_search))}
    if supports_iterative_scan(db):
        wanted["hnsw.iterative_scan"] = "strict_order" if filtered else "off"
    if local:
        changes = wanted
    else:
        db.ensure_connection()
        session = _session_settings(db)
        changes = {name: value for name, value in wanted.items() if session.get(name) != value}
    if not changes:
        return
    calls = ", ".join("set_config(%s, %s, %s)" for _ in changes)
    params: list[Any] = []
    for name, value in changes.items():
        params += [name, value, local]
    with db.cursor() as cursor:
        cursor.execute(f"SELECT {calls}", params)
    if not local:
        _session_settings(db).update(changes)


def _session_settings(db: Any) -> dict[str, str]:
    """What this process has SET on ``db``'s current server connection (a new connection starts
    with the server's defaults, so the record is keyed by the connection object)."""
    raw = db.connection
    record = getattr(db, "_embeddings_search_settings", None)
    if record is None or record[0] is not raw:
        record = (raw, {})
        db._embeddings_search_settings = record
    return record[1]


_extension_version: list[tuple[int, ...]] = []


def pgvector_version(db: Any = None) -> tuple[int, ...]:
    if not _extension_version:
        with (db or connection).cursor() as cursor:
            cursor.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            row = cursor.fetchone()
        _extension_version.append(
            tuple(int(part) for part in row[0].split(".") if part.isdigit()) if row else ()
        )
    return _extension_version[0]


def supports_iterative_scan(db: Any = None) -> bool:
    return pgvector_version(db) >= (0, 8)
