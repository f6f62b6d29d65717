"""Tampering with stored vectors the way an outside writer would (raw SQL), in either layout: the
statements are built from the version's store (its relation, key and column names), so a test
runs unchanged against a column of the user's table and against a table of the version's own."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.db import connection

from embeddings_app.models import EmbeddingVersion
from embeddings_app.stores import qn


def _names(version: EmbeddingVersion) -> tuple[str, str, str, str]:
    store = version.store
    return qn(store.relation), qn(store.key), qn(store.vector_column), qn(store.hash_column)


def forget(version: EmbeddingVersion, pks: Sequence[Any]) -> None:
    """The rows' vectors and source hashes set to NULL: missing for the version."""
    relation, key, vector, source_hash = _names(version)
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE {relation} SET {vector} = NULL, {source_hash} = NULL "
                       f"WHERE {key} = ANY(%s)", [list(pks)])


def swap_vectors(version: EmbeddingVersion, a: Any, b: Any) -> None:
    """Swap two rows' vectors (each still a plausible vector, just the wrong one)."""
    relation, key, vector, _ = _names(version)
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE {relation} x SET {vector} = y.{vector} FROM {relation} y "
                       f"WHERE (x.{key}, y.{key}) IN ((%s, %s), (%s, %s))", [a, b, b, a])


def vector_text(version: EmbeddingVersion, pk: Any) -> str:
    relation, key, vector, _ = _names(version)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {vector}::text FROM {relation} WHERE {key} = %s", [pk])
        return cursor.fetchone()[0]


def set_vector_text(version: EmbeddingVersion, pk: Any, text: str) -> None:
    relation, key, vector, _ = _names(version)
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE {relation} SET {vector} = %s::{version.storage} WHERE {key} = %s",
                       [text, pk])


def vector_type(version: EmbeddingVersion) -> str:
    """The SQL type of the version's vector column, e.g. ``vector(256)``."""
    store = version.store
    with connection.cursor() as cursor:
        cursor.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                       "WHERE attrelid = %s::regclass AND attname = %s",
                       [qn(store.relation), store.vector_column])
        return cursor.fetchone()[0]
