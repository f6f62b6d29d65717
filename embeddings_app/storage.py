"""The per-version columns on the user's table: their DDL and the bulk read/write of vectors.

Each version ``V`` of field ``F`` owns two nullable columns, added with no default (a metadata-only
change in PostgreSQL, instant on any table size):

* ``F_V``: ``vector(N)`` (or ``halfvec(N)``), the row's embedding;
* ``F_V_source_hash``: ``bytea``, the hash of the source text that vector was computed from, so a
  stale row is found by comparing it with the current source.

Neither is a Django model field: the ORM never loads them by accident.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from django.db import connection, transaction
from pgvector import HalfVector, Vector
from pgvector.psycopg import register_vector

from .exceptions import Refused

if TYPE_CHECKING:
    from .fields import VersionedEmbedding
    from .models import EmbeddingVersion

MAX_IDENTIFIER_LENGTH = 63  # PostgreSQL's NAMEDATALEN - 1
# Wait this long at most for the brief ACCESS EXCLUSIVE lock of ADD/DROP COLUMN: queueing behind a
# long transaction would block every read and write of the table behind us.
DDL_LOCK_TIMEOUT = "5s"


def qn(name: str) -> str:
    return connection.ops.quote_name(name)


def column_type(storage: str, dimensions: int) -> str:
    return f"{storage}({dimensions})"


def existing_columns(table: str) -> set[str]:
    """The table's columns, in one catalog query (Django's introspection runs two, and fails
    when a concurrent ``drop`` removes a column between them)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass "
                       "AND attnum > 0 AND NOT attisdropped", [qn(table)])
        return {row[0] for row in cursor.fetchall()}


def check_new_columns(field: VersionedEmbedding, version: str) -> None:
    columns = (field.column(version), field.hash_column(version))
    too_long = [name for name in columns if len(name) > MAX_IDENTIFIER_LENGTH]
    if too_long:
        raise Refused(
            f'Column name "{too_long[0]}" is longer than PostgreSQL\'s {MAX_IDENTIFIER_LENGTH} '
            "characters; choose a shorter version name."
        )
    taken = [name for name in columns if name in existing_columns(field.table)]
    if taken:
        raise Refused(
            f'Column "{taken[0]}" already exists on table {field.table}; choose another version name.'
        )


def add_columns(field: VersionedEmbedding, version: str, storage: str, dimensions: int) -> None:
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'")
        cursor.execute(
            f"ALTER TABLE {qn(field.table)} "
            f"ADD COLUMN {qn(field.column(version))} {column_type(storage, dimensions)}, "
            f"ADD COLUMN {qn(field.hash_column(version))} bytea"
        )


def indexes_on_column(table: str, column: str) -> list[str]:
    """Every index of ``table`` that uses ``column`` (as a key or in an expression)."""
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT i.relname, pg_get_indexdef(i.oid)
            FROM pg_index x
            JOIN pg_class i ON i.oid = x.indexrelid
            WHERE x.indrelid = %s::regclass
            """,
            [qn(table)],
        )
        pattern = re.compile(rf'(^|[^\w"]){re.escape(column)}($|[^\w"])|"{re.escape(column)}"')
        return [name for name, definition in cursor.fetchall()
                if pattern.search(definition.split(" USING ", 1)[-1])]


def drop_columns(version: EmbeddingVersion, field: VersionedEmbedding) -> list[str]:
    """Drop the version's indexes (concurrently: writes go on) and then its two columns."""
    dropped = indexes_on_column(field.table, version.column)
    with connection.cursor() as cursor:
        for index in dropped:
            # Not in a transaction: CONCURRENTLY refuses to run inside one.
            cursor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {qn(index)}")
    present = existing_columns(field.table)
    drops = [f"DROP COLUMN IF EXISTS {qn(name)}" for name in (version.column, version.hash_column)
             if name in present]
    if drops:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(f"SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'")
            cursor.execute(f"ALTER TABLE {qn(field.table)} {', '.join(drops)}")
    return dropped


def _register_types() -> None:
    """Teach this connection pgvector's binary formats (once per database connection).

    Asked of the connection itself: a set of ``id()``s of connections would be wrong once a
    closed connection is garbage-collected and a new one reuses its id (a worker reconnects
    after every task)."""
    connection.ensure_connection()
    raw = connection.connection
    if raw.adapters.types.get("vector") is None:
        register_vector(raw)


def _pk_db_type(field: VersionedEmbedding) -> str:
    pk = field.model._meta.pk
    db_type = pk.rel_db_type(connection)  # serial/identity -> the plain integer type
    if db_type is None:
        raise Refused(f"{field.target}: unsupported primary key type {type(pk).__name__}.")
    return db_type


def _to_db_vector(storage: str, vector: np.ndarray | None) -> Any:
    if vector is None:
        return None
    return HalfVector(vector) if storage == "halfvec" else Vector(vector)


def write_vectors(
    field: VersionedEmbedding,
    version: EmbeddingVersion,
    rows: Sequence[tuple[Any, bytes, np.ndarray | None]],
    expected: Mapping[Any, str] | None = None,
) -> dict[Any, str]:
    """Write ``(pk, source_hash, vector)`` rows with one binary COPY and one UPDATE ... FROM, in
    the caller's transaction. Returns pk -> the row's new version (``xmin``) of each row written.

    With ``expected`` (pk -> row version), a compare-and-set: a row is written only if it is
    still that version, i.e. no transaction has updated it since it was read (PostgreSQL gives
    a row a new ``xmin`` on every update, and re-checks the condition on the newest version when
    it waits for a concurrent writer). The others, and rows deleted meanwhile, are left as they
    are; the caller finds them missing from the result.
    """
    if not rows:
        return {}
    _register_types()
    pk_type = _pk_db_type(field)
    vec_type = column_type(version.storage, version.dimensions)
    staging = f"embeddings_staging_{version.storage}_{version.dimensions}_{pk_type.split('(')[0]}"
    pk_column = field.model._meta.pk.column
    # Rows in key order: the UPDATE then meets (and locks) them in key order in the plans
    # PostgreSQL picks for it (a hash or nested-loop join driven by the primary-key index or by
    # this table), so two writers of overlapping rows queue instead of deadlocking.
    rows = sorted(rows, key=lambda row: _sort_key(row[0]))
    with connection.cursor() as cursor:
        cursor.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {qn(staging)} (pk {pk_type} PRIMARY KEY, "
            f"vec {vec_type}, source_hash bytea, read_version text) ON COMMIT DELETE ROWS"
        )
        # Rows an earlier write of this transaction left (the commit empties the table). Here,
        # not after the UPDATE: a transaction's only write then finds nothing to delete. DELETE,
        # not TRUNCATE: a TRUNCATE gives the table a new file each time (measured: the slowest
        # statement of a small batch).
        cursor.execute(f"DELETE FROM {qn(staging)}")
        raw_cursor = cursor.cursor
        with raw_cursor.copy(
            f"COPY {qn(staging)} (pk, vec, source_hash, read_version) FROM STDIN "
            "WITH (FORMAT BINARY)"
        ) as copy:
            copy.set_types([pk_type, version.storage, "bytea", "text"])
            for pk, source_hash, vector in rows:
                copy.write_row((pk, _to_db_vector(version.storage, vector), source_hash,
                                None if expected is None else expected.get(pk)))
        compare = "" if expected is None else "AND t.xmin::text = s.read_version "
        # The keys again, as an array: the staging table has no statistics, and from its size
        # alone the planner guessed ~20,000 rows for a batch of 1,000 and scanned the whole
        # table for each batch (measured); with the array it finds the rows by the primary key.
        cursor.execute(
            f"UPDATE {qn(field.table)} AS t "
            f"SET {qn(version.column)} = s.vec, {qn(version.hash_column)} = s.source_hash "
            f"FROM {qn(staging)} AS s WHERE t.{qn(pk_column)} = s.pk "
            f"AND t.{qn(pk_column)} = ANY(%s::{pk_type}[]) {compare}"
            f"RETURNING t.{qn(pk_column)}, t.xmin::text",
            [[pk for pk, _, _ in rows]],
        )
        written = dict(cursor.fetchall())
    return written


def _sort_key(pk: Any) -> Any:
    """Primary keys in the order PostgreSQL sorts them (integers as numbers, UUIDs as text)."""
    return str(pk) if not isinstance(pk, int) else pk


def lock_rows(field: VersionedEmbedding, pks: Sequence[Any]) -> dict[Any, str]:
    """Lock the rows of ``pks`` (``FOR UPDATE``, in primary-key order, so two writers
    never deadlock) in the caller's transaction: pk -> the row's version (``xmin``) for each row
    still there. One statement with the keys as one array parameter."""
    if not pks:
        return {}
    pk_column = qn(field.model._meta.pk.column)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {pk_column}, xmin::text FROM {qn(field.table)} "
            f"WHERE {pk_column} = ANY(%s::{_pk_db_type(field)}[]) "
            f"ORDER BY {pk_column} FOR UPDATE",
            [list(pks)],
        )
        return dict(cursor.fetchall())


def read_vector(field: VersionedEmbedding, version: EmbeddingVersion, pk: Any) -> np.ndarray | None:
    _register_types()
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {qn(version.column)} FROM {qn(field.table)} "
            f"WHERE {qn(field.model._meta.pk.column)} = %s",
            [pk],
        )
        row = cursor.fetchone()
    if row is None or row[0] is None:
        return None
    return np.asarray(row[0].to_numpy(), dtype=np.float32)


def stored_hashes(
    field: VersionedEmbedding, versions: Sequence[EmbeddingVersion], pks: Sequence[Any]
) -> dict[Any, tuple[bytes | None, ...]]:
    """pk -> the stored source hash of each version (None where never embedded)."""
    if not versions or not pks:
        return {}
    columns = ", ".join(qn(version.hash_column) for version in versions)
    pk_column = qn(field.model._meta.pk.column)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {pk_column}, {columns} FROM {qn(field.table)} WHERE {pk_column} = ANY(%s)",
            [list(pks)],
        )
        return {
            row[0]: tuple(bytes(value) if value is not None else None for value in row[1:])
            for row in cursor.fetchall()
        }


def coverage(field: VersionedEmbedding, version: EmbeddingVersion) -> tuple[int, int]:
    """(rows with a vector or a recorded source hash, all rows) of the version."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT count({qn(version.hash_column)}), count(*) FROM {qn(field.table)}"
        )
        done, total = cursor.fetchone()
    return int(done), int(total)
