"""Where a version's vectors live: one store per version, the only code that names a version's
column or table in SQL.

``version.store`` is a ``VersionStore``: its subclass is the version's *layout*.

* ``ColumnStore`` (``"column"``): two nullable columns on the user's table, added with no default
  (a metadata-only change, instant on any table size): ``F_V`` (``vector(N)`` or ``halfvec(N)``)
  and ``F_V_source_hash`` (``bytea``). A backfill rewrites every row of the user's table.
* ``TableStore`` (``"table"``): a table of its own, ``<table>_F_V``, keyed by the model's primary
  key (a foreign key, ``ON DELETE CASCADE``: deleting a row deletes its vectors), with the columns
  ``vector``, ``source_hash`` and ``row_version`` (the ``xmin`` of the user's row the vector was
  written against). A backfill only inserts there; the user's table is never rewritten, and
  ``drop`` is ``DROP TABLE``: the space is back at once.
* ``ChunkStore`` (a chunked version, table layout): a ``TableStore`` whose table holds one vector
  per chunk of a row's text, keyed by (row key, chunk number), with the per-row source hash and
  row version in ``<table>__rows`` (``embeddings_app.chunking``).

All keep the same invariants (docs/backfill.md, "Compare-and-set"):

* a vector is written only while the user's row is still the version (``xmin``) its source text
  was read from: a slow writer never overwrites a newer vector;
* a row deleted meanwhile is never written (and, in a side table, leaves no vector behind);
* the source hash is stored beside the vector, so a row is *fresh* when it equals the hash of
  the row's current source text. A row without a stored hash is *missing*.

DDL and the statements of the write path are the ``sql_*`` templates of the classes (as Django's
schema editor keeps its own); identifiers are quoted by the connection (``qn``). No plain query
of the model loads a vector: neither the columns nor the side table are model fields.

DDL on the user's table takes its lock through ``lock_for_ddl``: bounded by
``DDL_LOCK_TIMEOUT`` (queued, it blocks every read and write of the table behind it), and never
queued behind an index build (``CREATE INDEX CONCURRENTLY`` waits for every older snapshot,
that of a session queued behind it too: a deadlock).
"""

from __future__ import annotations

import logging
import re
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import psycopg
from django.db import DatabaseError, OperationalError, connection, models, transaction
from django.db.models.expressions import Expression, ExpressionWrapper, RawSQL, Value
from django.db.models.lookups import IsNull
from pgvector import HalfVector, Vector
from pgvector.django import BitField, CosineDistance, HalfVectorField, HammingDistance, VectorField
from pgvector.psycopg import register_vector

from . import registry
from .config import LAYOUTS, get_config
from .exceptions import Refused

if TYPE_CHECKING:
    from .fields import VersionedEmbedding
    from .models import EmbeddingVersion

logger = logging.getLogger(__name__)

MAX_IDENTIFIER_LENGTH = 63  # PostgreSQL's NAMEDATALEN - 1
# Wait this long at most for the brief ACCESS EXCLUSIVE lock of ADD/DROP COLUMN or DROP TABLE:
# queueing behind a long transaction would block every read and write of the table behind us.
DDL_LOCK_TIMEOUT = "5s"
DDL_LOCK_SECONDS = 5.0
DDL_LOCK_POLL_SECONDS = 0.01
# The comment on a side table: how leftovers of a target are found again (``drop_leftovers``).
STORE_COMMENT = "embeddings_app store of {target}@{version}"

# (storage, distance) -> HNSW operator class
OPCLASSES = {
    ("vector", "cosine"): "vector_cosine_ops",
    ("halfvec", "cosine"): "halfvec_cosine_ops",
    ("vector", "l2"): "vector_l2_ops",
    ("halfvec", "l2"): "halfvec_l2_ops",
    ("vector", "ip"): "vector_ip_ops",
    ("halfvec", "ip"): "halfvec_ip_ops",
    # A binary-quantized version (``embeddings derive --storage bit``): its index finds
    # candidates by Hamming distance; they are re-ranked by the parent's exact distance.
    ("bit", "cosine"): "bit_hamming_ops",
    ("bit", "l2"): "bit_hamming_ops",
    ("bit", "ip"): "bit_hamming_ops",
}

MAX_EF_SEARCH = 1000  # pgvector's bound of hnsw.ef_search


# The lock DDL takes on the user's table (``lock_for_ddl``); who holds the table, and whether
# one of them is maintenance (an index build, VACUUM, DDL) rather than reads and writes.
SQL_LOCK_TABLE = "LOCK TABLE {table} IN {mode} MODE{nowait}"
SQL_LOCK_HOLDERS = ("SELECT l.pid, l.mode, left(regexp_replace(a.query, '\\s+', ' ', 'g'), 60) "
                    "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.relation = %s::regclass AND l.granted AND l.pid <> pg_backend_pid() "
                    "ORDER BY l.pid LIMIT 3")
SQL_MAINTENANCE_LOCKS = ("SELECT EXISTS (SELECT FROM pg_locks WHERE relation = %s::regclass "
                         "AND pid <> pg_backend_pid() AND mode NOT IN "
                         "('AccessShareLock', 'RowShareLock', 'RowExclusiveLock'))")
ACCESS_EXCLUSIVE = "ACCESS EXCLUSIVE"  # ADD/DROP COLUMN, DROP TABLE, DROP TRIGGER
SHARE_ROW_EXCLUSIVE = "SHARE ROW EXCLUSIVE"  # CREATE TRIGGER, a foreign key to the table


def lock_for_ddl(table: str, mode: str) -> None:
    """Take ``mode`` on ``table`` for the DDL that follows in the caller's transaction, within
    ``DDL_LOCK_SECONDS``, else refuse with the sessions holding the table (nothing changed).
    Also sets the transaction's ``lock_timeout`` for the other relations its DDL touches.

    * Held by reads and writes only: wait in the lock queue, as any DDL does (their
      transactions are short; a stream of them would starve a lock that never queues).
    * Held or requested in a maintenance mode (``CREATE INDEX CONCURRENTLY``, ``VACUUM``,
      DDL): never queue, retry ``NOWAIT`` every 10 ms. A queued request holds a snapshot while
      it waits, and an index build that holds the table waits for every older snapshot: a
      deadlock that PostgreSQL ends by failing one of the two (measured: either side, the index
      build left INVALID). What remains is the instant between the check and the queued
      request: a build that takes the table then is the deadlock's one way back."""
    if not connection.in_atomic_block:
        raise RuntimeError("lock_for_ddl() must run inside the DDL's transaction")
    deadline = time.monotonic() + DDL_LOCK_SECONDS
    with connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'")
        while True:
            if _try_lock(cursor, table, mode, nowait=True):
                return
            cursor.execute(SQL_MAINTENANCE_LOCKS, [qn(table)])
            if not cursor.fetchone()[0]:
                remaining_ms = int(max(deadline - time.monotonic(), 0.001) * 1000)
                cursor.execute(f"SET LOCAL lock_timeout = {remaining_ms}")
                locked = _try_lock(cursor, table, mode, nowait=False)
                cursor.execute(f"SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'")
                if locked:
                    return
            if time.monotonic() >= deadline:
                cursor.execute(SQL_LOCK_HOLDERS, [qn(table)])
                holders = "; ".join(f"pid {pid} {lock_mode} ({query or 'idle'})"
                                    for pid, lock_mode, query in cursor.fetchall())
                raise Refused(
                    f"Table {table} stayed locked by other sessions for "
                    f"{DDL_LOCK_SECONDS:g}s ({holders or 'since released'}), e.g. an index "
                    "build or a long transaction; nothing was changed: retry when it ends."
                )
            time.sleep(DDL_LOCK_POLL_SECONDS)


def _try_lock(cursor: Any, table: str, mode: str, *, nowait: bool) -> bool:
    """One attempt, in a savepoint (a failed attempt leaves the transaction usable)."""
    try:
        with transaction.atomic():
            cursor.execute(SQL_LOCK_TABLE.format(table=qn(table), mode=mode,
                                                 nowait=" NOWAIT" if nowait else ""))
        return True
    except OperationalError as exc:
        if not isinstance(exc.__cause__, psycopg.errors.LockNotAvailable):
            raise
        return False


# Not a version's storage: the advice for a column backfill on the user's table (``layout``).
SQL_SET_FILLFACTOR = "ALTER TABLE {table} SET (fillfactor = {fillfactor})"


def set_fillfactor_sql(table: str, fillfactor: int) -> str:
    return SQL_SET_FILLFACTOR.format(table=qn(table), fillfactor=int(fillfactor))


def qn(name: str) -> str:
    return connection.ops.quote_name(name)


def column_type(storage: str, dimensions: int) -> str:
    return f"{storage}({int(dimensions)})"


def existing_columns(table: str) -> set[str]:
    """The table's columns, in one catalog query (Django's introspection runs two, and fails
    when a concurrent ``drop`` removes a column between them)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass "
                       "AND attnum > 0 AND NOT attisdropped", [qn(table)])
        return {row[0] for row in cursor.fetchall()}


def indexes_on_column(table: str, column: str) -> list[str]:
    """Every index of ``table`` that uses ``column`` (as a key or in an expression)."""
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT i.relname, pg_get_indexdef(i.oid)
            FROM pg_index x
            JOIN pg_class i ON i.oid = x.indexrelid
            WHERE x.indrelid = to_regclass(%s)
            """,
            [qn(table)],
        )
        pattern = re.compile(rf'(^|[^\w"]){re.escape(column)}($|[^\w"])|"{re.escape(column)}"')
        return [name for name, definition in cursor.fetchall()
                if pattern.search(definition.split(" USING ", 1)[-1])]


def register_types() -> None:
    """Teach this connection pgvector's binary formats (once per database connection).

    Asked of the connection itself: a set of ``id()``s of connections would be wrong once a
    closed connection is garbage-collected and a new one reuses its id (a worker reconnects
    after every task)."""
    connection.ensure_connection()
    raw = connection.connection
    if raw.adapters.types.get("vector") is None:
        register_vector(raw)


def pk_db_type(field: VersionedEmbedding) -> str:
    pk = field.model._meta.pk
    db_type = pk.rel_db_type(connection)  # serial/identity -> the plain integer type
    if db_type is None:
        raise Refused(f"{field.target}: unsupported primary key type {type(pk).__name__}.")
    return db_type


def as_array(value: Any) -> np.ndarray:
    """A stored vector as float32: a ``vector``/``halfvec`` as it is, a ``bit`` string (a
    binary-quantized version) as its signs, +1 for a set bit and -1 for a clear one (so the
    cosine of two of them is 1 - 2 x their Hamming distance / dimensions)."""
    if isinstance(value, str):
        return np.where(np.frombuffer(value.encode(), dtype=np.uint8) == ord("1"), 1.0,
                        -1.0).astype(np.float32)
    return np.asarray(value.to_numpy(), dtype=np.float32)


def binary_signs(vectors: np.ndarray) -> np.ndarray:
    """pgvector's ``binary_quantize`` (a bit is set where the element is > 0) of float
    vectors, as the +1/-1 signs ``as_array`` reads a bit vector back as."""
    return np.where(np.asarray(vectors) > 0, 1.0, -1.0).astype(np.float32)


def converted(row: Sequence[Any], converters: Sequence[tuple[int, Sequence[Any], Any]],
              db: Any) -> Sequence[Any]:
    """``row`` with each database converter of the ORM applied to its column, as Django's own
    iterable applies them (``converters``: (index, functions, expression)); the row itself when
    there are none (a search builds its instances from it without a copy)."""
    if not converters:
        return row
    values = list(row)
    for index, funcs, expression in converters:
        for func in funcs:
            values[index] = func(values[index], expression, db)
    return values


def _to_db_vector(storage: str, vector: np.ndarray | None) -> Any:
    if vector is None:
        return None
    return HalfVector(vector) if storage == "halfvec" else Vector(vector)


def _sort_key(pk: Any) -> Any:
    """Primary keys in the order PostgreSQL sorts them (integers as numbers, UUIDs as text)."""
    return str(pk) if not isinstance(pk, int) else pk


class StoreColumn(Expression):
    """A store's vector column in a search query (it is not a model field): the user's table's
    alias for a column store, the side table joined by ``TableStore.search_queryset``."""

    def __init__(self, relation: str | None, column: str, output_field: models.Field) -> None:
        super().__init__(output_field=output_field)
        self.relation = relation  # None: the query's own table
        self.column = column

    def as_sql(self, compiler: Any, connection: Any) -> tuple[str, list[Any]]:
        if self.relation is None:
            # Django 6.1 has quote_name() and deprecates quote_name_unless_alias(); 5.2 has
            # only the latter. The initial alias is the table's own name: quoted alike by both.
            quote = getattr(compiler, "quote_name", None) or compiler.quote_name_unless_alias
            alias = quote(compiler.query.get_initial_alias())
        else:
            alias = connection.ops.quote_name(self.relation)
        return f"{alias}.{connection.ops.quote_name(self.column)}", []


class VersionStore:
    """Where one version's vectors and source hashes live, and every statement that reads or
    writes them. Subclasses override one hook each: where the vectors are added and dropped
    (``sql_add``/``drop``), how a write lands (``sql_write``), how a row of the user's table
    reaches its hash (``hash_sql``), its search join and its catch-up filter."""

    layout: ClassVar[str]
    # Does writing a vector give the user's row a new version (xmin)? Then the transactions that
    # wrote a batch's rows tell the catch-up pass which rows are unchanged since.
    rewrites_row: ClassVar[bool]

    # The lock ``add`` takes on the user's table (``lock_for_ddl``).
    add_lock_mode: ClassVar[str]
    sql_create_index = ("CREATE INDEX CONCURRENTLY {name} ON {relation} USING hnsw "
                        "({vector} {opclass}) WITH (m = {m}, ef_construction = {ef_construction})")
    sql_drop_index = "DROP INDEX CONCURRENTLY IF EXISTS {name}"
    sql_index_progress = ("SELECT phase, blocks_done, blocks_total, tuples_done, tuples_total "
                          "FROM pg_stat_progress_create_index WHERE relid = %s::regclass")
    sql_staging = ("CREATE TEMP TABLE IF NOT EXISTS {staging} (pk {pk_type} PRIMARY KEY, "
                   "vec {staged_type}, source_hash bytea, read_version text) "
                   "ON COMMIT DELETE ROWS")
    # Rows an earlier write of this transaction left (the commit empties the table). DELETE, not
    # TRUNCATE: a TRUNCATE gives the table a new file each time (measured: the slowest statement
    # of a small batch).
    sql_empty_staging = "DELETE FROM {staging}"
    sql_copy_staging = ("COPY {staging} (pk, vec, source_hash, read_version) FROM STDIN "
                        "WITH (FORMAT BINARY)")
    sql_add: ClassVar[str]
    sql_write: ClassVar[str]
    sql_coverage = "SELECT (SELECT count({hash}) FROM {relation}), (SELECT count(*) FROM {table})"
    sql_count_vectors = "SELECT count({vector}) FROM {relation}"
    sql_read_vectors = ("SELECT {key}, {vector}, {hash} FROM {relation} "
                        "WHERE {key} = ANY(%s::{pk_type}[]) AND {vector} IS NOT NULL")
    sql_read_vector = "SELECT {vector} FROM {relation} WHERE {key} = %s"
    sql_read_all = ("SELECT t.{pk}, v.{vector}, v.{hash} FROM {table} AS t "
                    "LEFT JOIN {relation} AS v ON v.{key} = t.{pk}")
    sql_sample = ("SELECT {key}, {vector}, {hash} FROM {relation} WHERE {vector} IS NOT NULL "
                  "ORDER BY random() LIMIT %s")

    def __init__(self, version: EmbeddingVersion, field: VersionedEmbedding | None = None) -> None:
        self.version = version
        self.field = field if field is not None else registry.get(version.target)

    # --- names ------------------------------------------------------------------------------
    @staticmethod
    def names(field: VersionedEmbedding, version_name: str) -> dict[str, str]:
        """The names a new version gets: ``column``, ``hash_column`` and ``table`` (empty for a
        column store) of ``EmbeddingVersion``."""
        raise NotImplementedError

    @property
    def table(self) -> str:
        """The user's table."""
        return self.field.table

    @property
    def relation(self) -> str:
        """The table that holds the vectors."""
        raise NotImplementedError

    @property
    def key(self) -> str:
        """The column of ``relation`` holding the user's row's primary key."""
        return self.field.model._meta.pk.column

    @property
    def vector_column(self) -> str:
        return self.version.column

    @property
    def hash_column(self) -> str:
        return self.version.hash_column

    def describe(self) -> str:
        """Where the vectors are, for messages: 'column C of table T' or 'table S'."""
        raise NotImplementedError

    def describe_storage(self) -> str:
        """Everything ``drop`` removes besides indexes, for messages."""
        return self.describe()

    def describe_indexed(self) -> str:
        """Where the HNSW index is built (``index_name``), for messages."""
        return self.describe()

    def relations(self) -> list[str]:
        """The tables of their own the version occupies (for sizes); none for a column store."""
        return []

    def _staging_name(self, prefix: str) -> str:
        """The session's temporary staging table for this store's rows: one per storage,
        dimensions and key type, so every version of that shape reuses it."""
        pk_type = pk_db_type(self.field)
        return qn(f"{prefix}_{self.staged_storage}_{int(self.version.dimensions)}_"
                  f"{pk_type.split('(')[0]}")

    def _format(self, template: str, **extra: Any) -> str:
        return template.format(
            relation=qn(self.relation), table=qn(self.table), key=qn(self.key),
            pk=qn(self.field.model._meta.pk.column), vector=qn(self.vector_column),
            hash=qn(self.hash_column), pk_type=pk_db_type(self.field),
            vec_type=column_type(self.version.storage, self.version.dimensions),
            staged_type=column_type(self.staged_storage, self.version.dimensions),
            staged_vec=self.staged_value("s.vec"), **extra)

    @property
    def staged_storage(self) -> str:
        """The type vectors are sent to PostgreSQL as: a bit version is sent the model's float
        vectors and quantizes them in SQL (``staged_value``)."""
        return "vector" if self.version.storage == "bit" else self.version.storage

    def staged_value(self, expression: str) -> str:
        """SQL storing the sent vector ``expression`` in the version's type."""
        if self.version.storage == "bit":
            return f"binary_quantize({expression})::bit({int(self.version.dimensions)})"
        return expression

    # --- add and drop -----------------------------------------------------------------------
    @classmethod
    def check_new(cls, field: VersionedEmbedding, version_name: str) -> None:
        """Refuse names that PostgreSQL would truncate or that are taken."""
        names = cls.names(field, version_name)
        for name in filter(None, names.values()):
            if len(name) > MAX_IDENTIFIER_LENGTH:
                raise Refused(
                    f'The name "{name}" is longer than PostgreSQL\'s {MAX_IDENTIFIER_LENGTH} '
                    "characters; choose a shorter version name."
                )
        cls._check_free(field, names)

    @classmethod
    def _check_free(cls, field: VersionedEmbedding, names: dict[str, str]) -> None:
        raise NotImplementedError

    def add(self) -> None:
        """Create the version's storage, in the caller's transaction (if any)."""
        with transaction.atomic(), connection.cursor() as cursor:
            lock_for_ddl(self.field.table, self.add_lock_mode)
            cursor.execute(self._format(self.sql_add))
            self._after_add(cursor)

    def _after_add(self, cursor: Any) -> None:
        pass

    def drop(self) -> list[str]:
        """Drop the version's indexes and storage; returns the names of the indexes dropped."""
        raise NotImplementedError

    def drop_refusal(self) -> str | None:
        """Why ``drop`` must not remove this storage (one line with what to do), or None."""
        return None

    def exists(self) -> bool:
        """Is any of the version's storage still there (e.g. after an interrupted drop)?"""
        raise NotImplementedError

    # --- indexes ----------------------------------------------------------------------------
    def index_name(self) -> str:
        return f"{self.relation}_{self.vector_column}_hnsw"[:MAX_IDENTIFIER_LENGTH]

    def indexes(self) -> list[str]:
        """Every index on the version's vector column."""
        return indexes_on_column(self.relation, self.vector_column)

    def opclass(self) -> str:
        try:
            return OPCLASSES[(self.version.storage, self.version.distance)]
        except KeyError:
            raise Refused(
                f"{self.version}: no HNSW operator class for {self.version.storage} with "
                f"{self.version.distance} distance."
            ) from None

    def create_index_sql(self) -> str:
        return self._format(self.sql_create_index, name=qn(self.index_name()),
                            opclass=self.opclass(), m=int(self.version.hnsw_m),
                            ef_construction=int(self.version.hnsw_ef_construction))

    def drop_index_sql(self, name: str | None = None) -> str:
        return self.sql_drop_index.format(name=qn(name or self.index_name()))

    def index_progress_query(self) -> tuple[str, list[str]]:
        """The query (and its parameters) reading the progress of an index build on the
        version's vectors (one row while a build runs, none otherwise)."""
        return self.sql_index_progress, [qn(self.relation)]

    # --- the write path ---------------------------------------------------------------------
    def write(self, rows: Sequence[tuple[Any, bytes, np.ndarray | None]],
              expected: Mapping[Any, str] | None = None) -> dict[Any, str]:
        """Write ``(pk, source_hash, vector)`` rows with one binary COPY and one statement, in
        the caller's transaction. Returns pk -> the user's row's version (``xmin``, as text)
        after the write, for each row written.

        With ``expected`` (pk -> row version), a compare-and-set: a row is written only if the
        user's row is still that version, i.e. no transaction has updated it since it was read.
        The others, and rows deleted meanwhile, are left as they are; the caller finds them
        missing from the result."""
        if not rows:
            return {}
        register_types()
        pk_type = pk_db_type(self.field)
        storage = self.staged_storage
        staging = self._staging_name("embeddings_staging")
        # Rows in key order: the statement then meets (and locks) them in key order in the plans
        # PostgreSQL picks for it, so two writers of overlapping rows queue instead of deadlocking.
        rows = sorted(rows, key=lambda row: _sort_key(row[0]))
        with connection.cursor() as cursor:
            cursor.execute(self._format(self.sql_staging, staging=staging))
            cursor.execute(self.sql_empty_staging.format(staging=staging))
            with cursor.cursor.copy(self.sql_copy_staging.format(staging=staging)) as copy:
                copy.set_types([pk_type, storage, "bytea", "text"])
                for pk, source_hash, vector in rows:
                    copy.write_row((pk, _to_db_vector(storage, vector), source_hash,
                                    None if expected is None else expected.get(pk)))
            compare = "" if expected is None else "AND t.xmin::text = s.read_version"
            # The keys again, as an array: the staging table has no statistics, and from its size
            # alone the planner guessed ~20,000 rows for a batch of 1,000 and scanned the whole
            # table for each batch (measured); with the array it finds the rows by the key.
            cursor.execute(self._format(self.sql_write, staging=staging, compare=compare),
                           [[pk for pk, _, _ in rows]])
            return dict(cursor.fetchall())

    # --- reads ------------------------------------------------------------------------------
    def hash_sql(self, row: str) -> str:
        """SQL for the stored source hash of the user's row ``row`` (a quoted alias)."""
        raise NotImplementedError

    def read_vector(self, pk: Any) -> np.ndarray | None:
        register_types()
        with connection.cursor() as cursor:
            cursor.execute(self._format(self.sql_read_vector), [pk])
            row = cursor.fetchone()
        if row is None or row[0] is None:
            return None
        return as_array(row[0])

    def read_all(self) -> dict[Any, tuple[np.ndarray | None, bytes | None]]:
        """pk -> (vector, stored source hash) for every row of the user's table (a full read:
        for checks over a whole table, such as the tests')."""
        register_types()
        with connection.cursor() as cursor:
            cursor.execute(self._format(self.sql_read_all))
            return {pk: (None if vector is None else as_array(vector),
                         None if source_hash is None else bytes(source_hash))
                    for pk, vector, source_hash in cursor.fetchall()}

    def read_vectors(self, pks: Sequence[Any]) -> dict[Any, tuple[np.ndarray, bytes | None]]:
        """pk -> (vector as float32, stored source hash) for those of ``pks`` with a vector."""
        if not pks:
            return {}
        register_types()
        with connection.cursor() as cursor:
            cursor.execute(self._format(self.sql_read_vectors), [list(pks)])
            return {pk: (as_array(vector),
                         None if source_hash is None else bytes(source_hash))
                    for pk, vector, source_hash in cursor.fetchall()}

    def vector_count(self) -> int:
        """Vectors stored (the rows an index build inserts): one scan of ``relation``."""
        with connection.cursor() as cursor:
            cursor.execute(self._format(self.sql_count_vectors))
            return int(cursor.fetchone()[0])

    def coverage(self) -> tuple[int, int]:
        """(rows with a vector or a recorded source hash, all rows of the user's table)."""
        with connection.cursor() as cursor:
            cursor.execute(self._format(self.sql_coverage))
            done, total = cursor.fetchone()
        return int(done), int(total)

    def sample(self, size: int) -> list[tuple[Any, Any, bytes | None]]:
        """``size`` random (pk, vector, source hash) rows that have a vector."""
        register_types()
        with connection.cursor() as cursor:
            cursor.execute(self._format(self.sql_sample), [size])
            return cursor.fetchall()

    # --- search -----------------------------------------------------------------------------
    def vector_expression(self) -> StoreColumn:
        storage = self.version.storage
        output = {"halfvec": HalfVectorField, "bit": BitField}.get(storage, VectorField)(
            **({"length": self.version.dimensions} if storage == "bit"
               else {"dimensions": self.version.dimensions}))
        return StoreColumn(self._search_relation(), self.vector_column, output)

    def rerank_parent(self) -> VersionStore | None:
        """The store whose full-precision vectors re-rank this version's candidates: the
        parent's, for a bit version; None otherwise."""
        if self.version.storage != "bit":
            return None
        parent = self.version.derived_from
        if parent is None:
            raise Refused(f"{self.version} is binary-quantized but has no parent version to "
                          "re-rank its candidates with; derive it again from a written version.")
        return store_for(parent, self.field)

    @staticmethod
    def rerank_candidates(k: int) -> int:
        """Candidates a bit version's Hamming index gives for a search of ``k``:
        ``EMBEDDINGS["RERANK_OVERSAMPLING"]`` x k; they are re-ranked by the parent's exact
        distance (docs/cutover.md, "Binary quantization with a re-rank")."""
        return get_config().rerank_oversampling * int(k)

    def search_settings(self, ef_search: int, k: int) -> tuple[int, bool]:
        """(``hnsw.ef_search``, whether the scan must be iterative) for a search of ``k``: a bit
        version's index must give ``rerank_candidates(k)`` rows, so its ef_search is raised to
        that (up to pgvector's 1,000) and, beyond it, pgvector 0.8's iterative scan (relaxed
        order: the candidates are re-ranked anyway) continues the scan."""
        if self.version.storage != "bit":
            return ef_search, False
        wanted = self.rerank_candidates(k)
        return min(MAX_EF_SEARCH, max(ef_search, wanted)), wanted > MAX_EF_SEARCH

    def _search_relation(self) -> str | None:
        return None

    def search_queryset(self, queryset: models.QuerySet, literal: str,
                        k: int | None = None) -> models.QuerySet:
        """``queryset`` ordered by cosine distance to the query vector (``literal``, pgvector's
        text form), each row with ``.distance``; rows without a vector are left out.

        A bit version (``k`` given): the ``rerank_candidates(k)`` rows of ``queryset`` nearest
        by Hamming distance between its bits and the query's (``binary_quantize`` in SQL, its
        HNSW index with ``bit_hamming_ops``), ordered by the parent's exact cosine distance."""
        parent = self.rerank_parent()
        if parent is not None:
            candidates = self._candidates(queryset, literal, self.rerank_candidates(k or 10))
            # The re-rank: the exact distance of each candidate by the parent's vectors. "+ 0"
            # makes the ORDER BY one that the parent's HNSW index cannot serve, so PostgreSQL
            # never answers it with an (approximate) scan of that index over the candidates.
            exact = parent.vector_expression()
            return (parent._join(queryset.filter(pk__in=candidates))
                    .annotate(distance=ExpressionWrapper(
                        CosineDistance(exact, Value(literal)) + Value(0.0),
                        output_field=models.FloatField()))
                    .filter(IsNull(exact, False)).order_by("distance", "pk"))
        column = self.vector_expression()
        # On the column, not on the distance: the query vector is then sent and computed once
        # per row, as in hand-written SQL.
        return (self._join(queryset).annotate(distance=CosineDistance(column, Value(literal)))
                .filter(IsNull(column, False)).order_by("distance", "pk"))

    def _join(self, queryset: models.QuerySet) -> models.QuerySet:
        return queryset

    def query_bits_sql(self) -> str:
        """The query vector (one parameter) binary-quantized in SQL, as the bit version's
        column type."""
        return f"binary_quantize(%s::vector)::bit({int(self.version.dimensions)})"

    def _candidates(self, queryset: models.QuerySet, literal: str, count: int) -> Any:
        """The keys of the ``count`` rows of ``queryset`` nearest to the query by Hamming
        distance (a bit version's index): the right-hand side of a ``pk__in`` filter."""
        column = self.vector_expression()
        query_bits = RawSQL(self.query_bits_sql(), (literal,), output_field=BitField())
        return (queryset.annotate(_embeddings_hamming=HammingDistance(column, query_bits))
                .filter(IsNull(column, False)).order_by("_embeddings_hamming")
                .values("pk")[:count])

    @property
    def search_key(self) -> tuple[Any, ...]:
        """What the SQL of a search depends on (compiled searches are cached by it)."""
        parent = self.rerank_parent()
        return (self.layout, self.relation, self.vector_column, self.version.storage,
                int(self.version.dimensions), parent.search_key if parent is not None else None)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VersionStore) and other.search_key == self.search_key

    def __hash__(self) -> int:
        return hash(self.search_key)

    # --- catch-up ---------------------------------------------------------------------------
    def catch_up(self, queryset: models.QuerySet, write_xids: Sequence[str]) -> models.QuerySet:
        """The rows of ``queryset`` (a top-level query of the user's table) that may have changed
        since the run wrote them, given the transactions that wrote its batches."""
        raise NotImplementedError


class ColumnStore(VersionStore):
    """Two columns on the user's table: ``F_V`` (the vector) and ``F_V_source_hash``."""

    layout = "column"
    rewrites_row = True
    add_lock_mode = ACCESS_EXCLUSIVE

    sql_add = "ALTER TABLE {table} ADD COLUMN {vector} {vec_type}, ADD COLUMN {hash} bytea"
    # An adopted column (``embeddings_app.adopt``): the vectors are there, only the hashes are new.
    sql_add_hash = "ALTER TABLE {table} ADD COLUMN {hash} bytea"
    sql_drop_columns = "ALTER TABLE {table} {drops}"
    sql_write = ("UPDATE {table} AS t SET {vector} = {staged_vec}, {hash} = s.source_hash "
                 "FROM {staging} AS s WHERE t.{pk} = s.pk AND t.{pk} = ANY(%s::{pk_type}[]) "
                 "{compare} RETURNING t.{pk}, t.xmin::text")

    @staticmethod
    def names(field: VersionedEmbedding, version_name: str) -> dict[str, str]:
        return {"column": f"{field.name}_{version_name}",
                "hash_column": f"{field.name}_{version_name}_source_hash", "table": ""}

    @classmethod
    def _check_free(cls, field: VersionedEmbedding, names: dict[str, str]) -> None:
        present = existing_columns(field.table)
        for name in (names["column"], names["hash_column"]):
            if name in present:
                raise Refused(f'Column "{name}" already exists on table {field.table}; '
                              "choose another version name.")

    @classmethod
    def adopted_names(cls, field: VersionedEmbedding, version_name: str,
                      column: str) -> dict[str, str]:
        """The names of a version adopting the existing vector column ``column`` of the user's
        table: the vectors stay where they are, the source hashes get a column of their own."""
        hash_column = cls.names(field, version_name)["hash_column"]
        if len(hash_column) > MAX_IDENTIFIER_LENGTH:
            raise Refused(f'The name "{hash_column}" is longer than PostgreSQL\'s '
                          f"{MAX_IDENTIFIER_LENGTH} characters; choose a shorter version name.")
        if hash_column in existing_columns(field.table):
            raise Refused(f'Column "{hash_column}" already exists on table {field.table}; '
                          "choose another version name.")
        return {"column": column, "hash_column": hash_column, "table": ""}

    def add_adopted(self) -> None:
        """The storage of an adopted version: its source-hash column (the vectors exist)."""
        with transaction.atomic(), connection.cursor() as cursor:
            lock_for_ddl(self.table, ACCESS_EXCLUSIVE)
            cursor.execute(self._format(self.sql_add_hash))

    def model_field(self) -> models.Field | None:
        """The field of the user's model whose column holds the vectors (an adopted
        ``VectorField``), or None."""
        return next((f for f in self.field.model._meta.concrete_fields
                     if f.column == self.vector_column), None)

    def drop_refusal(self) -> str | None:
        model_field = self.model_field()
        if model_field is None or self.vector_column not in existing_columns(self.table):
            return None
        model = self.field.model._meta
        return (f"{self.version}'s vectors are column {self.vector_column} of table {self.table}, "
                f"the field {model.label}.{model_field.name} of your model: dropping it here "
                f"would break the model. Remove the field {model_field.name} from {model.label}, "
                f"run `manage.py makemigrations {model.app_label}` and `manage.py migrate "
                f"{model.app_label}` (Django drops the column), then run `manage.py embeddings "
                f"drop {self.version.target} {self.version.version}` again to drop "
                f"{self.hash_column}.")

    @property
    def relation(self) -> str:
        return self.field.table

    def describe(self) -> str:
        return f"column {self.vector_column} of table {self.table}"

    def describe_storage(self) -> str:
        return f"columns {self.vector_column} and {self.hash_column} of table {self.table}"

    def exists(self) -> bool:
        return bool({self.vector_column, self.hash_column} & existing_columns(self.table))

    def drop(self) -> list[str]:
        dropped = self.indexes()
        with connection.cursor() as cursor:
            for index in dropped:
                # Not in a transaction: CONCURRENTLY refuses to run inside one.
                cursor.execute(self.drop_index_sql(index))
        present = existing_columns(self.table)
        drops = [f"DROP COLUMN IF EXISTS {qn(name)}"
                 for name in (self.vector_column, self.hash_column) if name in present]
        if drops:
            with transaction.atomic(), connection.cursor() as cursor:
                lock_for_ddl(self.table, ACCESS_EXCLUSIVE)
                cursor.execute(self.sql_drop_columns.format(table=qn(self.table),
                                                            drops=", ".join(drops)))
        return dropped

    def hash_sql(self, row: str) -> str:
        return f"{row}.{qn(self.hash_column)}"

    def catch_up(self, queryset: models.QuerySet, write_xids: Sequence[str]) -> models.QuerySet:
        if not write_xids:
            return queryset
        # A row whose version is the transaction of a batch that wrote it is as it left it.
        return queryset.alias(_embeddings_written_by_run=RawSQL(
            "xmin::text = ANY(%s)", (list(write_xids),),
            output_field=models.BooleanField())).filter(_embeddings_written_by_run=False)


class TableStore(VersionStore):
    """A table of the version's own, keyed by the user's primary key (see the module docstring).

    The write is one ``INSERT ... ON CONFLICT DO UPDATE`` fed by a ``SELECT ... FOR SHARE`` of the
    user's rows: the share lock makes a concurrent ``UPDATE`` or ``DELETE`` of a row wait for this
    write (or, if it came first, makes this write wait and then re-check the row's version, which
    has changed, so the row is left out). ``FOR KEY SHARE`` would not do: it does not conflict with
    an ``UPDATE`` of non-key columns, which could then commit its newer vector first."""

    layout = "table"
    rewrites_row = False
    add_lock_mode = SHARE_ROW_EXCLUSIVE  # the foreign key to the user's table

    sql_add = ("CREATE TABLE {relation} ("
               "{key} {pk_type} PRIMARY KEY REFERENCES {table} ({pk}) ON DELETE CASCADE, "
               "{vector} {vec_type}, {hash} bytea, row_version xid NOT NULL)")
    sql_comment = "COMMENT ON TABLE {relation} IS %s"
    sql_drop = "DROP TABLE IF EXISTS {relation}"
    sql_write = ("WITH locked AS ("
                 "SELECT t.{pk} AS pk, t.xmin AS row_version FROM {table} AS t "
                 "JOIN {staging} AS s ON s.pk = t.{pk} "
                 "WHERE t.{pk} = ANY(%s::{pk_type}[]) {compare} ORDER BY t.{pk} FOR SHARE OF t) "
                 "INSERT INTO {relation} AS v ({key}, {vector}, {hash}, row_version) "
                 "SELECT s.pk, {staged_vec}, s.source_hash, l.row_version "
                 "FROM {staging} AS s JOIN locked AS l ON l.pk = s.pk ORDER BY s.pk "
                 "ON CONFLICT ({key}) DO UPDATE SET {vector} = EXCLUDED.{vector}, "
                 "{hash} = EXCLUDED.{hash}, row_version = EXCLUDED.row_version "
                 "RETURNING v.{key}, v.row_version::text")
    sql_catch_up = ("NOT EXISTS (SELECT 1 FROM {relation} AS v WHERE v.{key} = {table}.{pk} "
                    "AND v.row_version = {table}.xmin)")
    # The write of rows that have no vector here yet (a backfill's rows): lock the user's rows
    # first (``FOR SHARE``, key order) and read their versions and whether a vector exists, then
    # COPY the rows whose version is still the one read straight into the table: no staging
    # table, no second pass over the vectors (measured: the staging write was 40 to 45% of a
    # side-table backfill's time at batch 1,000, docs/benchmarks.md).
    sql_lock_rows = ("SELECT t.{pk}, t.xmin::text, v.{key} IS NOT NULL FROM {table} AS t "
                     "LEFT JOIN {relation} AS v ON v.{key} = t.{pk} "
                     "WHERE t.{pk} = ANY(%s::{pk_type}[]) ORDER BY t.{pk} FOR SHARE OF t")
    sql_copy = ("COPY {relation} ({key}, {vector}, {hash}, row_version) FROM STDIN "
                "WITH (FORMAT BINARY)")

    @staticmethod
    def names(field: VersionedEmbedding, version_name: str) -> dict[str, str]:
        return {"column": "vector", "hash_column": "source_hash",
                "table": f"{field.table}_{field.name}_{version_name}"}

    @classmethod
    def _check_free(cls, field: VersionedEmbedding, names: dict[str, str]) -> None:
        if names["table"] in connection.introspection.table_names():
            raise Refused(f'Table "{names["table"]}" already exists; choose another version name.')

    @property
    def relation(self) -> str:
        return self.version.table

    def describe(self) -> str:
        return f"table {self.relation}"

    def relations(self) -> list[str]:
        return [self.relation]

    def _after_add(self, cursor: Any) -> None:
        cursor.execute(self._format(self.sql_comment),
                       [STORE_COMMENT.format(target=self.version.target,
                                             version=self.version.version)])

    def exists(self) -> bool:
        return self.relation in connection.introspection.table_names()

    def drop(self) -> list[str]:
        # DROP TABLE locks the user's table too, briefly (to remove the foreign key's triggers):
        # bounded by the same lock timeout as a column's ALTER TABLE.
        dropped = self.indexes()
        with transaction.atomic(), connection.cursor() as cursor:
            lock_for_ddl(self.field.table, ACCESS_EXCLUSIVE)  # the foreign key's triggers
            cursor.execute(self._format(self.sql_drop))
        return dropped

    def write(self, rows: Sequence[tuple[Any, bytes, np.ndarray | None]],
              expected: Mapping[Any, str] | None = None) -> dict[Any, str]:
        """``VersionStore.write``, with the same compare-and-set (docs/backfill.md): the user's
        rows are locked ``FOR SHARE`` and their versions read in one statement, then the rows
        still at the version read and without a vector here are copied in directly; rows that
        have one (a refresh) go through ``sql_write``'s upsert. A concurrent writer of the same
        rows that inserted first (the COPY meets its key) sends the copied rows to the upsert
        too, the locks kept. A bit version (its vectors quantized in SQL) takes ``sql_write``."""
        if not rows:
            return {}
        if self.staged_storage != self.version.storage:  # quantized in SQL: the staging path
            return super().write(rows, expected)
        register_types()
        rows = sorted(rows, key=lambda row: _sort_key(row[0]))
        with transaction.atomic(savepoint=False), connection.cursor() as cursor:
            # In autocommit, the transaction the locks need (atomic(savepoint=False) adds none
            # inside the caller's transaction).
            cursor.execute(self._format(self.sql_lock_rows), [[pk for pk, _, _ in rows]])
            current = {pk: (row_version, present) for pk, row_version, present in cursor.fetchall()}
            # The compare-and-set: only rows still at the version their text was read from.
            kept = [row for row in rows if row[0] in current and (
                expected is None or current[row[0]][0] == expected.get(row[0]))]
            new = [row for row in kept if not current[row[0]][1]]
            upsert = [row for row in kept if current[row[0]][1]]
            written: dict[Any, str] = {}
            if new:
                try:
                    with transaction.atomic():  # a savepoint: a failed COPY leaves no row
                        self._copy(cursor, new, current)
                    written.update((row[0], current[row[0]][0]) for row in new)
                except psycopg.errors.UniqueViolation:
                    upsert = sorted(upsert + new, key=lambda row: _sort_key(row[0]))
            if upsert:
                written.update(super().write(upsert, {row[0]: current[row[0]][0]
                                                      for row in upsert}))
        return written

    def _copy(self, cursor: Any, rows: Sequence[tuple[Any, bytes, np.ndarray | None]],
              current: Mapping[Any, tuple[str, bool]]) -> None:
        storage = self.version.storage
        with cursor.cursor.copy(self._format(self.sql_copy)) as copy:
            # xid has no binary dumper in psycopg; its binary form is oid's (an unsigned 32-bit
            # integer), and the row versions are xids read from this database.
            copy.set_types([pk_db_type(self.field), storage, "bytea", "oid"])
            for pk, source_hash, vector in rows:
                copy.write_row((pk, _to_db_vector(storage, vector), source_hash,
                                int(current[pk][0])))

    def hash_sql(self, row: str) -> str:
        return (f"(SELECT v.{qn(self.hash_column)} FROM {qn(self.relation)} AS v "
                f"WHERE v.{qn(self.key)} = {row}.{qn(self.field.model._meta.pk.column)})")

    def _search_relation(self) -> str | None:
        return self.relation

    def _join(self, queryset: models.QuerySet) -> models.QuerySet:
        # QuerySet.extra(): the one public way to join a table that is not a model (load-bearing:
        # the search must scan the side table's HNSW index and join the user's rows to it).
        main = queryset.query.get_initial_alias()
        return queryset.extra(tables=[self.relation], where=[
            f"{qn(self.relation)}.{qn(self.key)} = {qn(main)}.{qn(self.field.model._meta.pk.column)}"])

    def _candidates(self, queryset: models.QuerySet, literal: str, count: int) -> Any:
        # The side table alone, in raw SQL: the join of ``_join`` (QuerySet.extra) names the
        # user's table by its name, which a subquery would take for the outer query's row. A
        # filtered search keeps the keys of its queryset (pgvector's iterative scan goes on
        # until ``count`` of them are found).
        params: list[Any] = []
        where = ""
        if queryset.query.has_filters():
            keys_sql, keys_params = queryset.values("pk").query.sql_with_params()
            where = f" AND v.{qn(self.key)} IN ({keys_sql})"
            params += list(keys_params)
        sql = (f"SELECT v.{qn(self.key)} FROM {qn(self.relation)} AS v "
               f"WHERE v.{qn(self.vector_column)} IS NOT NULL{where} "
               f"ORDER BY v.{qn(self.vector_column)} <~> {self.query_bits_sql()} "
               f"LIMIT {int(count)}")
        return RawSQL(sql, [*params, literal])

    def catch_up(self, queryset: models.QuerySet, write_xids: Sequence[str]) -> models.QuerySet:
        # A row whose version is the one its vector was written against is unchanged since.
        return queryset.extra(where=[self._format(self.sql_catch_up)])


class ChunkStore(TableStore):
    """A chunked version (``embeddings_app.chunking``): one vector per chunk of a row's text, in a
    table of the version's own keyed by (row key, ``chunk_no``), with the HNSW index over chunks;
    beside it ``<table>__rows``, one record per row with the row's source hash and the row version
    it was written against (what a ``TableStore`` keeps beside its vector). Both reference the
    user's table ``ON DELETE CASCADE``.

    The write keeps the side table's compare-and-set (the user's rows locked ``FOR SHARE``, a row
    written only while still at the version read) and writes only what changed: a chunk whose
    number, hash and offsets are stored already is left as it is, a chunk sent without a vector
    takes the stored vector of the row's chunk with the same hash, chunks past the row's new count
    are deleted."""

    rows_suffix = "__rows"
    sql_add = ("CREATE TABLE {relation} ("
               "{key} {pk_type} NOT NULL REFERENCES {table} ({pk}) ON DELETE CASCADE, "
               "chunk_no integer NOT NULL, chunk_hash bytea NOT NULL, "
               "start_char integer NOT NULL, end_char integer NOT NULL, {vector} {vec_type}, "
               "PRIMARY KEY ({key}, chunk_no))")
    sql_add_rows = ("CREATE TABLE {rows} ("
                    "{key} {pk_type} PRIMARY KEY REFERENCES {table} ({pk}) ON DELETE CASCADE, "
                    "{hash} bytea, row_version xid NOT NULL)")
    sql_comment_rows = "COMMENT ON TABLE {rows} IS %s"
    sql_drop = "DROP TABLE IF EXISTS {relation}, {rows}"
    sql_coverage = "SELECT (SELECT count({hash}) FROM {rows}), (SELECT count(*) FROM {table})"
    sql_catch_up = ("NOT EXISTS (SELECT 1 FROM {rows} AS v WHERE v.{key} = {table}.{pk} "
                    "AND v.row_version = {table}.xmin)")
    sql_lock_rows = ("SELECT t.{pk}, t.xmin::text FROM {table} AS t "
                     "WHERE t.{pk} = ANY(%s::{pk_type}[]) ORDER BY t.{pk} FOR SHARE OF t")
    sql_stored_hashes = ("SELECT {key}, chunk_hash FROM {relation} "
                         "WHERE {key} = ANY(%s::{pk_type}[])")
    sql_chunk_staging = ("CREATE TEMP TABLE IF NOT EXISTS {staging} (pk {pk_type}, "
                         "chunk_no integer, chunk_hash bytea, start_char integer, "
                         "end_char integer, vec {staged_type}) ON COMMIT DELETE ROWS")
    sql_copy_chunks = ("COPY {staging} (pk, chunk_no, chunk_hash, start_char, end_char, vec) "
                       "FROM STDIN WITH (FORMAT BINARY)")
    # Rows one of whose chunks was sent without a vector while the row has no stored chunk of
    # that hash any more: left out of this write (a conflict).
    sql_lost_reuse = ("SELECT DISTINCT s.pk FROM {staging} AS s WHERE s.vec IS NULL AND NOT EXISTS "
                      "(SELECT 1 FROM {relation} AS c WHERE c.{key} = s.pk "
                      "AND c.chunk_hash = s.chunk_hash)")
    sql_write_rows = ("INSERT INTO {rows} AS v ({key}, {hash}, row_version) "
                      "SELECT k, h, x::xid FROM unnest(%s::{pk_type}[], %s::bytea[], %s::text[]) "
                      "AS u(k, h, x) ORDER BY k "
                      "ON CONFLICT ({key}) DO UPDATE SET {hash} = EXCLUDED.{hash}, "
                      "row_version = EXCLUDED.row_version")
    sql_write_chunks = ("INSERT INTO {relation} AS c ({key}, chunk_no, chunk_hash, start_char, "
                        "end_char, {vector}) "
                        "SELECT s.pk, s.chunk_no, s.chunk_hash, s.start_char, s.end_char, "
                        "coalesce({staged_vec}, (SELECT o.{vector} FROM {relation} AS o "
                        "WHERE o.{key} = s.pk AND o.chunk_hash = s.chunk_hash LIMIT 1)) "
                        "FROM {staging} AS s WHERE s.pk = ANY(%s::{pk_type}[]) "
                        "ORDER BY s.pk, s.chunk_no "
                        "ON CONFLICT ({key}, chunk_no) DO UPDATE SET "
                        "chunk_hash = EXCLUDED.chunk_hash, start_char = EXCLUDED.start_char, "
                        "end_char = EXCLUDED.end_char, {vector} = EXCLUDED.{vector} "
                        "WHERE (c.chunk_hash, c.start_char, c.end_char) IS DISTINCT FROM "
                        "(EXCLUDED.chunk_hash, EXCLUDED.start_char, EXCLUDED.end_char)")
    sql_delete_surplus = ("DELETE FROM {relation} AS c WHERE c.{key} = ANY(%s::{pk_type}[]) "
                          "AND c.chunk_no >= coalesce((SELECT max(s.chunk_no) + 1 "
                          "FROM {staging} AS s WHERE s.pk = c.{key}), 0)")
    sql_nearest = ("SELECT c.{key}, c.chunk_no, c.start_char, c.end_char, "
                   "c.{vector} <=> %s::{vec_type} AS distance FROM {relation} AS c "
                   "WHERE c.{vector} IS NOT NULL{filter} "
                   "ORDER BY c.{vector} <=> %s::{vec_type} LIMIT %s")
    # The rows themselves in the same statement (``nearest_rows``): the nearest chunks, the best
    # one per row, the user's rows joined, and how many chunks were read (was that all?). The
    # count is a window over the chunks read (evaluated before DISTINCT ON keeps one per row),
    # not a second scan of a materialized CTE: measured, the CTE and its count cost about 30 us
    # of planning and execution more than the same statement without them.
    sql_nearest_rows = ("SELECT {columns}, best.chunk_no AS _embeddings_chunk_no, "
                        "best.start_char AS _embeddings_chunk_start, "
                        "best.end_char AS _embeddings_chunk_end, best.distance AS distance, "
                        "best.chunks_read AS _embeddings_chunks_read "
                        "FROM (SELECT DISTINCT ON (cand.row_key) cand.*, "
                        "count(*) OVER () AS chunks_read "
                        "FROM (SELECT c.{key} AS row_key, c.chunk_no, c.start_char, c.end_char, "
                        "c.{vector} <=> %s::{vec_type} AS distance "
                        "FROM {relation} AS c WHERE c.{vector} IS NOT NULL{filter} "
                        "ORDER BY c.{vector} <=> %s::{vec_type} LIMIT %s) AS cand "
                        "ORDER BY cand.row_key, cand.distance) AS best "
                        "JOIN {table} AS t ON t.{pk} = best.row_key "
                        "ORDER BY best.distance, t.{pk} LIMIT %s")
    sql_read_chunks = ("SELECT {key}, {vector} FROM {relation} WHERE {key} = ANY(%s::{pk_type}[]) "
                       "AND {vector} IS NOT NULL ORDER BY {key}, chunk_no")
    sql_read_all = ("SELECT t.{pk}, r.{hash} FROM {table} AS t "
                    "LEFT JOIN {rows} AS r ON r.{key} = t.{pk}")
    sql_sample = ("SELECT c.{key}, c.{vector}, r.{hash}, c.start_char, c.end_char "
                  "FROM {relation} AS c JOIN {rows} AS r ON r.{key} = c.{key} "
                  "WHERE c.{vector} IS NOT NULL ORDER BY random() LIMIT %s")

    @property
    def rows_relation(self) -> str:
        """The table of one record per row: its source hash and row version."""
        return self.relation + self.rows_suffix

    def _format(self, template: str, **extra: Any) -> str:
        return super()._format(template, rows=qn(self.rows_relation), **extra)

    @classmethod
    def check_new(cls, field: VersionedEmbedding, version_name: str) -> None:
        super().check_new(field, version_name)
        rows = cls.names(field, version_name)["table"] + cls.rows_suffix
        if len(rows) > MAX_IDENTIFIER_LENGTH:
            raise Refused(f'The name "{rows}" is longer than PostgreSQL\'s '
                          f"{MAX_IDENTIFIER_LENGTH} characters; choose a shorter version name.")
        if rows in connection.introspection.table_names():
            raise Refused(f'Table "{rows}" already exists; choose another version name.')

    def describe(self) -> str:
        return f"tables {self.relation} and {self.rows_relation}"

    def describe_indexed(self) -> str:
        return f"table {self.relation}"  # over chunks; the rows' table has no vector

    def relations(self) -> list[str]:
        return [self.relation, self.rows_relation]

    def _after_add(self, cursor: Any) -> None:
        cursor.execute(self._format(self.sql_add_rows))
        comment = STORE_COMMENT.format(target=self.version.target, version=self.version.version)
        cursor.execute(self._format(self.sql_comment), [comment])
        cursor.execute(self._format(self.sql_comment_rows), [comment])

    def exists(self) -> bool:
        return bool(set(self.relations()) & set(connection.introspection.table_names()))

    def hash_sql(self, row: str) -> str:
        return (f"(SELECT v.{qn(self.hash_column)} FROM {qn(self.rows_relation)} AS v "
                f"WHERE v.{qn(self.key)} = {row}.{qn(self.field.model._meta.pk.column)})")

    def search_settings(self, ef_search: int, k: int) -> tuple[int, bool]:
        """Always iterative: the k distinct rows may need more chunks than ef_search."""
        return ef_search, True

    # --- the write path ---------------------------------------------------------------------
    def stored_chunk_hashes(self, pks: Sequence[Any]) -> dict[Any, set[bytes]]:
        """Row key -> the hashes of its stored chunks."""
        found: dict[Any, set[bytes]] = {}
        if not pks:
            return found
        with connection.cursor() as cursor:
            cursor.execute(self._format(self.sql_stored_hashes), [list(pks)])
            for pk, digest in cursor.fetchall():
                found.setdefault(pk, set()).add(bytes(digest))
        return found

    def write(self, rows: Sequence[tuple[Any, bytes, Any]],
              expected: Mapping[Any, str] | None = None) -> dict[Any, str]:
        """``(pk, source_hash, chunks)`` rows (``chunks``: ``chunking.ChunkRow``s, or None for
        a blank text): the class docstring's write, with ``VersionStore.write``'s contract."""
        if not rows:
            return {}
        register_types()
        pk_type = pk_db_type(self.field)
        storage = self.staged_storage
        staging = self._staging_name("embeddings_chunk_staging")
        rows = sorted(rows, key=lambda row: _sort_key(row[0]))
        with transaction.atomic(savepoint=False), connection.cursor() as cursor:
            cursor.execute(self._format(self.sql_lock_rows), [[row[0] for row in rows]])
            current = dict(cursor.fetchall())
            kept = [row for row in rows if row[0] in current and (
                expected is None or current[row[0]] == expected.get(row[0]))]
            if not kept:
                return {}
            cursor.execute(self._format(self.sql_chunk_staging, staging=staging))
            cursor.execute(self.sql_empty_staging.format(staging=staging))
            with cursor.cursor.copy(self.sql_copy_chunks.format(staging=staging)) as copy:
                copy.set_types([pk_type, "int4", "bytea", "int4", "int4", storage])
                for pk, _, chunks in kept:
                    for number, digest, start, end, vector in chunks or ():
                        copy.write_row((pk, number, digest, start, end,
                                        _to_db_vector(storage, vector)))
            cursor.execute(self._format(self.sql_lost_reuse, staging=staging))
            lost = {pk for (pk,) in cursor.fetchall()}
            kept = [row for row in kept if row[0] not in lost]
            if not kept:
                return {}
            keys = [row[0] for row in kept]
            cursor.execute(self._format(self.sql_write_rows),
                           [keys, [row[1] for row in kept], [current[key] for key in keys]])
            cursor.execute(self._format(self.sql_write_chunks, staging=staging), [keys])
            cursor.execute(self._format(self.sql_delete_surplus, staging=staging), [keys])
        return {key: current[key] for key in keys}

    # --- reads ------------------------------------------------------------------------------
    def read_chunk_vectors(self, pks: Sequence[Any]) -> dict[Any, np.ndarray]:
        """Row key -> its chunk vectors (one row per chunk, in chunk order)."""
        register_types()
        found: dict[Any, list[np.ndarray]] = {}
        with connection.cursor() as cursor:
            cursor.execute(self._format(self.sql_read_chunks), [list(pks)])
            for pk, vector in cursor.fetchall():
                found.setdefault(pk, []).append(as_array(vector))
        return {pk: np.vstack(vectors) for pk, vectors in found.items()}

    def read_vector(self, pk: Any) -> np.ndarray | None:
        """The row's chunk vectors as one array (chunks x dimensions), or None."""
        return self.read_chunk_vectors([pk]).get(pk)

    def read_all(self) -> dict[Any, tuple[np.ndarray | None, bytes | None]]:
        """pk -> (its chunk vectors, chunks x dimensions, or None; stored source hash)."""
        with connection.cursor() as cursor:
            cursor.execute(self._format(self.sql_read_all))
            hashes = {pk: None if digest is None else bytes(digest)
                      for pk, digest in cursor.fetchall()}
        vectors = self.read_chunk_vectors(list(hashes))
        return {pk: (vectors.get(pk), digest) for pk, digest in hashes.items()}

    def read_vectors(self, pks: Sequence[Any]) -> dict[Any, tuple[np.ndarray, bytes | None]]:
        raise Refused(f"{self.version} is chunked: it has no one vector per row to derive "
                      "from; derive from a whole-row version.")

    def sample(self, size: int) -> list[tuple[Any, Any, bytes | None, int, int]]:
        """``size`` random chunks: (pk, vector, the row's source hash, start, end)."""
        register_types()
        with connection.cursor() as cursor:
            cursor.execute(self._format(self.sql_sample), [size])
            return cursor.fetchall()

    # --- search -----------------------------------------------------------------------------
    def nearest_rows_sql(self, keys_sql: str) -> str:
        """``sql_nearest_rows`` for the model's columns, in field order (parameters: the query
        vector twice, the filter's, the chunks to read, k). The statement around the filter is
        formatted once per store and model (``_nearest_rows_parts``: quoting every name took
        about 30 us, the largest piece of a search's own cost); the filter is put in its place
        each call."""
        model = self.field.model
        cache_key = (self.search_key, model)
        parts = _nearest_rows_parts.get(cache_key)
        if parts is None:
            columns = ", ".join(f"t.{qn(f.column)}" for f in model._meta.concrete_fields)
            head, tail = self._format(self.sql_nearest_rows, filter="\0", columns=columns).split(
                "\0")
            parts = _nearest_rows_parts[cache_key] = (head, qn(self.key), tail)
        head, key, tail = parts
        return f"{head} AND c.{key} IN ({keys_sql}){tail}" if keys_sql else head + tail

    def nearest_chunks(self, literal: str, keys_sql: str, keys_params: Sequence[Any],
                       limit: int) -> list[tuple[Any, int, int, int, float]]:
        """The ``limit`` chunks nearest to the query (cosine distance), nearest first, of the
        rows whose keys ``keys_sql`` selects (all rows if empty): (key, chunk_no, start, end,
        distance)."""
        where = f" AND c.{qn(self.key)} IN ({keys_sql})" if keys_sql else ""
        with connection.cursor() as cursor:
            cursor.execute(self._format(self.sql_nearest, filter=where),
                           [literal, *keys_params, literal, int(limit)])
            return cursor.fetchall()


# (search_key, model) -> ``sql_nearest_rows`` cut where the filter goes: (the SQL before it, the
# quoted key column, the SQL after it). One entry per chunked version and model searched.
_nearest_rows_parts: dict[tuple[Any, type[models.Model]], tuple[str, str, str]] = {}


class ExistingVectors:
    """Vectors an application already has, read by ``embeddings adopt``
    (``embeddings_app.adopt``): a vector column of the user's table (``table`` None), or a
    table of its own holding a key -> vector mapping (``key``: a unique column holding the
    user's primary key; by default that table's own primary key).

    Only reads: the column or table is the user's. Rows of such a table whose key is not a row
    of the user's table are ignored."""

    sql_type = ("SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
                "WHERE a.attrelid = to_regclass(%s) AND a.attname = %s AND a.attnum > 0 "
                "AND NOT a.attisdropped")
    # The single-column unique indexes of a table: (column, is primary key).
    sql_unique_columns = ("SELECT a.attname, x.indisprimary FROM pg_index x "
                          "JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = x.indkey[0] "
                          "WHERE x.indrelid = to_regclass(%s) AND x.indisunique AND x.indnkeyatts = 1 "
                          "AND x.indpred IS NULL")
    sql_sample = ("SELECT v.{key}, v.{vector} FROM {relation} AS v JOIN {table} AS t "
                  "ON t.{pk} = v.{key} WHERE v.{vector} IS NOT NULL ORDER BY random() LIMIT %s")
    sql_read = ("SELECT v.{key}, v.{vector} FROM {relation} AS v "
                "WHERE v.{key} = ANY(%s::{pk_type}[]) AND v.{vector} IS NOT NULL")
    sql_count = ("SELECT count(*) FROM {relation} AS v JOIN {table} AS t ON t.{pk} = v.{key} "
                 "WHERE v.{vector} IS NOT NULL")
    TYPE = re.compile(r"(vector|halfvec)\((\d+)\)")

    def __init__(self, field: VersionedEmbedding, column: str, table: str | None = None,
                 key: str | None = None) -> None:
        self.field = field
        self.column = column
        self.relation = table or field.table
        self.in_table = table is not None
        self.key = key or (self._primary_key() if table else field.model._meta.pk.column)

    def describe(self) -> str:
        return (f"column {self.column} of table {self.relation}" + (
            f" (keyed by {self.key})" if self.in_table else ""))

    def _primary_key(self) -> str:
        unique = self._unique_columns()
        primary = [name for name, is_primary in unique.items() if is_primary]
        if not primary:
            raise Refused(f"Table {self.relation} has no single-column primary key; name the "
                          "column holding the key of your rows.", option="key")
        return primary[0]

    def _unique_columns(self) -> dict[str, bool]:
        with connection.cursor() as cursor:
            cursor.execute("SELECT to_regclass(%s)", [qn(self.relation)])
            if cursor.fetchone()[0] is None:
                raise Refused(f"There is no table {self.relation}; name an existing table.",
                              option="table")
            cursor.execute(self.sql_unique_columns, [qn(self.relation)])
            return dict(cursor.fetchall())

    def _format(self, template: str) -> str:
        return template.format(relation=qn(self.relation), table=qn(self.field.table),
                               key=qn(self.key), vector=qn(self.column),
                               pk=qn(self.field.model._meta.pk.column),
                               pk_type=pk_db_type(self.field))

    def inspect(self) -> tuple[str, int]:
        """(storage, dimensions) of the column: ``vector(N)`` or ``halfvec(N)``; refused with
        the reason for anything else (a missing column or table, another type, no dimension,
        a key that is not unique)."""
        if self.in_table:
            unique = self._unique_columns()
            if self.key not in existing_columns(self.relation):
                raise Refused(f"Table {self.relation} has no column {self.key}; name the column "
                              "holding the key of your rows.", option="key")
            if self.key not in unique:
                raise Refused(f"Column {self.key} of table {self.relation} is not unique (no "
                              "unique index or primary key on it alone): a row could have two "
                              "vectors. Add a unique index, or name another column.", option="key")
        with connection.cursor() as cursor:
            cursor.execute("SELECT to_regclass(%s)", [qn(self.relation)])
            if cursor.fetchone()[0] is None:
                raise Refused(f"There is no table {self.relation}.")
            cursor.execute(self.sql_type, [qn(self.relation), self.column])
            row = cursor.fetchone()
        if row is None:
            raise Refused(f"Table {self.relation} has no column {self.column}; name the column "
                          "holding your vectors.", option="column")
        found = self.TYPE.fullmatch(row[0])
        if found is None:
            raise Refused(f"Column {self.column} of table {self.relation} is {row[0]}, not a "
                          "pgvector vector(N) or halfvec(N) with a fixed dimension; nothing to "
                          "adopt (ALTER it to vector(N) first, or add a new version).")
        return found.group(1), int(found.group(2))

    def count(self) -> int:
        """Rows of the user's table with a vector here."""
        with connection.cursor() as cursor:
            cursor.execute(self._format(self.sql_count))
            return int(cursor.fetchone()[0])

    def sample(self, size: int) -> dict[Any, np.ndarray]:
        """``size`` random rows of the user's table with a vector: pk -> vector (float32)."""
        register_types()
        with connection.cursor() as cursor:
            cursor.execute(self._format(self.sql_sample), [size])
            return {pk: np.asarray(vector.to_numpy(), dtype=np.float32)
                    for pk, vector in cursor.fetchall()}

    def read(self, pks: Sequence[Any]) -> dict[Any, np.ndarray]:
        """pk -> vector (float32) for those of ``pks`` with a vector."""
        if not pks:
            return {}
        register_types()
        with connection.cursor() as cursor:
            cursor.execute(self._format(self.sql_read), [list(pks)])
            return {pk: np.asarray(vector.to_numpy(), dtype=np.float32)
                    for pk, vector in cursor.fetchall()}


class ChangeQueue:
    """Change capture of one target (docs/backfill.md, "Change capture"): a queue table of its
    own and a trigger on the user's table that appends the key of every row inserted, or updated
    in one of the source columns to another value, whatever wrote it (``QuerySet.update()``,
    ``bulk_update``, ``bulk_create``, raw SQL, ``COPY``, another service). One per target, not
    per version: one entry serves every written version.

    * The queue is append-only (``id`` from an identity, ``row_key``, ``queued_at``): a change
      committed while a drain works on an earlier entry of the same row gets an entry of its own,
      so deleting the entries a drain took never loses a later change.
    * Two row triggers share one function: ``AFTER INSERT``, and ``AFTER UPDATE OF`` the source
      columns ``WHEN`` one of them ``IS DISTINCT FROM`` its old value (PostgreSQL evaluates the
      column list and the condition without calling the function: an update of other columns, or
      one that writes the same text, costs nothing and queues nothing).
    * The function names its queue with the schema it was installed in, so a writer with another
      ``search_path`` queues into the same table.
    """

    sql_create_queue = ("CREATE TABLE IF NOT EXISTS {queue} ("
                        "id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
                        "row_key {pk_type} NOT NULL, "
                        "queued_at timestamptz NOT NULL DEFAULT now())")
    sql_comment = "COMMENT ON TABLE {queue} IS %s"
    sql_create_function = ("CREATE OR REPLACE FUNCTION {function}() RETURNS trigger "
                           "LANGUAGE plpgsql AS $capture$ BEGIN "
                           "INSERT INTO {queue} (row_key) VALUES (NEW.{pk}); RETURN NULL; "
                           "END $capture$")
    sql_create_insert_trigger = ("CREATE OR REPLACE TRIGGER {insert_trigger} AFTER INSERT ON "
                                 "{table} FOR EACH ROW EXECUTE FUNCTION {function}()")
    sql_create_update_trigger = ("CREATE OR REPLACE TRIGGER {update_trigger} AFTER UPDATE OF "
                                 "{columns} ON {table} FOR EACH ROW WHEN ({changed}) "
                                 "EXECUTE FUNCTION {function}()")
    sql_column_changed = "OLD.{column} IS DISTINCT FROM NEW.{column}"
    sql_drop_trigger = "DROP TRIGGER IF EXISTS {trigger} ON {table}"
    sql_drop_function = "DROP FUNCTION IF EXISTS {function}()"
    sql_drop_queue = "DROP TABLE IF EXISTS {queue}"
    sql_installed = ("SELECT (SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass(%s) "
                     "AND tgname = ANY(%s) AND NOT tgisinternal) = 2 AND to_regclass(%s) IS NOT NULL")
    # The oldest entry is the one with the lowest id (ids are taken in insert order; a
    # transaction that commits late may hold a lower id than one that committed before it).
    sql_stats = ("SELECT count(*), extract(epoch FROM now() - (SELECT queued_at FROM {queue} "
                 "ORDER BY id LIMIT 1)) FROM {queue}")
    sql_claim = ("SELECT id, row_key FROM {queue} ORDER BY id LIMIT %s "
                 "FOR UPDATE SKIP LOCKED")
    sql_delete = "DELETE FROM {queue} WHERE id = ANY(%s)"
    sql_enqueue = ("INSERT INTO {queue} (row_key, queued_at) "
                   "SELECT * FROM unnest(%s::{pk_type}[], %s::timestamptz[])")

    def __init__(self, field: VersionedEmbedding) -> None:
        self.field = field

    # --- names ------------------------------------------------------------------------------
    @property
    def queue(self) -> str:
        """``<table>_<field>__changes``: no version's table (``<table>_<field>_<version>``, a
        version name starts with a letter) can take it."""
        return _bounded(f"{self.field.table}_{self.field.name}", "__changes")

    @property
    def function(self) -> str:
        return _bounded(f"{self.field.table}_{self.field.name}", "__capture")

    @property
    def triggers(self) -> tuple[str, str]:
        """(the INSERT trigger, the UPDATE trigger): names of the user's table's namespace."""
        return (_bounded(f"embeddings_{self.field.name}", "_insert"),
                _bounded(f"embeddings_{self.field.name}", "_update"))

    def source_columns(self) -> list[str]:
        assert self.field.source_fields is not None
        return [self.field.model._meta.get_field(name).column for name in self.field.source_fields]

    def _format(self, template: str, schema: str | None = None, **extra: Any) -> str:
        queue = qn(self.queue) if schema is None else f"{qn(schema)}.{qn(self.queue)}"
        function = qn(self.function) if schema is None else f"{qn(schema)}.{qn(self.function)}"
        insert_trigger, update_trigger = self.triggers
        return template.format(
            queue=queue, function=function, table=qn(self.field.table),
            pk=qn(self.field.model._meta.pk.column), pk_type=pk_db_type(self.field),
            insert_trigger=qn(insert_trigger), update_trigger=qn(update_trigger), **extra)

    # --- install and remove -----------------------------------------------------------------
    def install(self) -> None:
        """Create the queue, the function and both triggers (idempotent), in the caller's
        transaction if any; creating a trigger waits for the table's writes in flight and
        blocks new ones briefly, bounded by the same lock timeout as a store's DDL."""
        columns = self.source_columns()
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SELECT current_schema()")
            (schema,) = cursor.fetchone()
            lock_for_ddl(self.field.table, SHARE_ROW_EXCLUSIVE)
            self._create_queue(cursor, schema)
            if LogicalChangeQueue(self.field).published(cursor):  # leaving the log: what it
                # holds of this table is queued first (writes wait for our lock meanwhile)
                from .capture import collect  # lazy: capture imports this module

                collect(fields=[self.field], advance=False)
                LogicalChangeQueue(self.field).leave_publication(cursor)
                transaction.on_commit(CaptureSlot().drop_if_unused)
            cursor.execute(self._format(self.sql_create_function, schema))
            cursor.execute(self._format(self.sql_create_insert_trigger, schema))
            changed = " OR ".join(self.sql_column_changed.format(column=qn(column))
                                  for column in columns)
            cursor.execute(self._format(self.sql_create_update_trigger, schema,
                                        columns=", ".join(qn(column) for column in columns),
                                        changed=changed))

    def _create_queue(self, cursor: Any, schema: str) -> None:
        cursor.execute(self._format(self.sql_create_queue, schema))
        cursor.execute(self._format(self.sql_comment, schema),
                       [CAPTURE_COMMENT.format(target=self.field.target)])

    def _drop_triggers(self, cursor: Any) -> None:
        for trigger in self.triggers:
            cursor.execute(self.sql_drop_trigger.format(trigger=qn(trigger),
                                                        table=qn(self.field.table)))
        cursor.execute(self._format(self.sql_drop_function))

    def remove(self) -> None:
        """Drop both triggers, the function and the queue, and leave the logical capture's
        publication (idempotent: whichever way the target was captured)."""
        with transaction.atomic(), connection.cursor() as cursor:
            lock_for_ddl(self.field.table, ACCESS_EXCLUSIVE)
            self._drop_triggers(cursor)
            LogicalChangeQueue(self.field).leave_publication(cursor)
            cursor.execute(self._format(self.sql_drop_queue))
        transaction.on_commit(CaptureSlot().drop_if_unused)

    def installed(self) -> bool:
        """Are both triggers on the user's table and the queue there?"""
        with connection.cursor() as cursor:
            cursor.execute(self.sql_installed,
                           [qn(self.field.table), list(self.triggers), qn(self.queue)])
            return bool(cursor.fetchone()[0])

    # --- the queue --------------------------------------------------------------------------
    def stats(self) -> tuple[int, float | None]:
        """(entries waiting, age in seconds of the oldest, None when empty): one count of the
        queue, which a drain keeps small."""
        with connection.cursor() as cursor:
            cursor.execute(self._format(self.sql_stats))
            depth, age = cursor.fetchone()
        return int(depth), None if age is None else max(float(age), 0.0)

    def claim(self, cursor: Any, limit: int) -> list[tuple[int, Any]]:
        """Lock up to ``limit`` of the oldest entries no other transaction holds (``FOR UPDATE
        SKIP LOCKED``: two drains never take the same entry), in ``cursor``'s transaction:
        [(entry id, row key)]."""
        cursor.execute(self._format(self.sql_claim), [limit])
        return [(int(entry), key) for entry, key in cursor.fetchall()]

    def delete(self, cursor: Any, entries: Sequence[int]) -> None:
        cursor.execute(self._format(self.sql_delete), [list(entries)])

    def enqueue(self, cursor: Any, keys: Sequence[Any], queued_at: Sequence[Any]) -> None:
        """Append entries (``keys[i]`` changed at ``queued_at[i]``): the logical capture's
        collect, which reads the changes after their commit."""
        cursor.execute(self._format(self.sql_enqueue), [list(keys), list(queued_at)])


class LogicalChangeQueue(ChangeQueue):
    """Change capture read from the write-ahead log (``EMBEDDINGS["CHANGE_CAPTURE"] =
    "logical"``): the same queue table and drain as ``ChangeQueue``, but nothing on the user's
    table. The table joins the database's publication (``CaptureSlot``), published with its
    primary key alone, and ``capture.collect`` reads the keys of the rows inserted or updated
    from the slot after they commit, queueing those not fresh (so an update of other columns
    or of the same text queues nothing, as with the trigger). A writer pays nothing of ours (only
    what ``wal_level = logical`` adds to every table's log records); the reading is the drain's.

    A table whose replica identity is ``FULL`` or an index is published whole (a column list
    must cover the replica identity, or PostgreSQL would refuse the table's updates), as is any
    table before PostgreSQL 15 (no column lists); one with
    ``REPLICA IDENTITY NOTHING`` is refused, since publishing its updates would make them fail.
    """

    sql_relreplident = "SELECT relreplident FROM pg_class WHERE oid = to_regclass(%s)"
    sql_add_table = "ALTER PUBLICATION {publication} ADD TABLE {table}{columns}"
    sql_drop_table = "ALTER PUBLICATION {publication} DROP TABLE {table}"
    sql_in_publication = ("SELECT EXISTS (SELECT 1 FROM pg_publication_rel r JOIN pg_publication "
                          "p ON p.oid = r.prpubid WHERE p.pubname = %s "
                          "AND r.prrelid = to_regclass(%s))")

    def install(self) -> None:
        """Create the queue and add the table to the publication (idempotent), in the caller's
        transaction if any; the slot and the publication must exist (``CaptureSlot.ensure``,
        outside any transaction). Removes the trigger capture if it was there."""
        slot = CaptureSlot()
        slot.require()
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(self.sql_relreplident, [qn(self.field.table)])
            (identity,) = cursor.fetchone()
            if identity == "n":
                raise Refused(f"{self.field.target}: {self.field.table} has REPLICA IDENTITY "
                              "NOTHING, and PostgreSQL fails the updates of a table published "
                              'without one; use the trigger (CHANGE_CAPTURE = True) or give it a '
                              "replica identity.")
            cursor.execute("SELECT current_schema()")
            (schema,) = cursor.fetchone()
            lock_for_ddl(self.field.table, SHARE_ROW_EXCLUSIVE)
            self._create_queue(cursor, schema)
            self._drop_triggers(cursor)
            if not self.published(cursor):
                # Column lists are PostgreSQL 15+; before, and with another replica identity,
                # the table is published whole.
                columns = (f" ({qn(self.field.model._meta.pk.column)})"
                           if identity == "d" and connection.pg_version >= 150000 else "")
                cursor.execute(self.sql_add_table.format(
                    publication=qn(slot.publication), table=qn(self.field.table),
                    columns=columns))

    def published(self, cursor: Any) -> bool:
        """Is the table in the publication?"""
        cursor.execute(self.sql_in_publication, [CaptureSlot.publication, qn(self.field.table)])
        return bool(cursor.fetchone()[0])

    def leave_publication(self, cursor: Any) -> bool:
        """Take the table out of the publication, if it is there (the caller's transaction);
        True when it was."""
        if not self.published(cursor):
            return False
        cursor.execute(self.sql_drop_table.format(publication=qn(CaptureSlot.publication),
                                                  table=qn(self.field.table)))
        return True

    def installed(self) -> bool:
        """Is the queue there, the table in the publication and the slot in place?"""
        with connection.cursor() as cursor:
            published = self.published(cursor)
            cursor.execute("SELECT to_regclass(%s) IS NOT NULL", [qn(self.queue)])
            queued = bool(cursor.fetchone()[0])
        return published and queued and CaptureSlot().exists()


class CaptureSlot:
    """The logical capture's two objects of a database: the publication ``embeddings_capture``
    (the tables captured, each with its key: ``LogicalChangeQueue``; inserts and updates only)
    and the logical replication slot ``embeddings_<database>`` (plugin ``pgoutput``, built into
    PostgreSQL), which keeps the write-ahead log from where ``capture.collect`` last read.

    * Created before the first table joins (a slot cannot be created in a transaction that has
      written, and it waits for the transactions in flight: bounded by ``DDL_LOCK_TIMEOUT``).
    * Dropped, with the publication, when the last table leaves it: a slot nobody reads keeps
      the write-ahead log forever (``status``, the admin and ``check --deploy`` show its
      backlog, ``embeddings.W123``).
    * Read with ``peek`` and moved on with ``advance`` only after the rows read are written or
      queued, committed: a reader that dies in between reads the same changes again (found
      fresh, or queued twice: harmless), never loses one. One reader at a time (an advisory
      lock): PostgreSQL lets one session use a slot at once.
    """

    publication = "embeddings_capture"
    sql_wal_level = "SHOW wal_level"
    sql_publication_exists = "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = %s)"
    sql_create_publication = "CREATE PUBLICATION {publication} WITH (publish = 'insert, update')"
    sql_drop_publication = "DROP PUBLICATION IF EXISTS {publication}"
    sql_publication_tables = ("SELECT count(*) FROM pg_publication_rel r JOIN pg_publication p "
                              "ON p.oid = r.prpubid WHERE p.pubname = %s")
    sql_slot_exists = ("SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = %s "
                       "AND database = current_database())")
    sql_create_slot = "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')"
    sql_drop_slot = ("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                     "WHERE slot_name = %s")
    sql_peek = ("SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes(%s, NULL, %s, "
                "'proto_version', '1', 'publication_names', %s)")
    sql_advance = "SELECT pg_replication_slot_advance(%s, %s::pg_lsn)"
    sql_backlog = ("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn) "
                   "FROM pg_replication_slots WHERE slot_name = %s")
    sql_reader_lock = "SELECT pg_try_advisory_lock(%s)"
    sql_reader_wait = "SELECT pg_advisory_lock(%s)"
    sql_reader_unlock = "SELECT pg_advisory_unlock(%s)"
    READER_LOCK = 0x656D6263  # "embc": the advisory lock key of the one reader of the slot

    def __init__(self, using: Any = None) -> None:
        self.connection = using or connection

    @property
    def name(self) -> str:
        database = self.connection.settings_dict["NAME"] or "postgres"
        return _bounded("embeddings_" + re.sub(r"[^a-z0-9_]", "_", database.lower()), "")

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        with self.connection.cursor() as cursor:
            cursor.execute(sql, params)
            row = cursor.fetchone()
        return None if row is None else row[0]

    def wal_level(self) -> str:
        return str(self._one(self.sql_wal_level))

    def exists(self) -> bool:
        return bool(self._one(self.sql_slot_exists, [self.name]))

    def backlog(self) -> int | None:
        """Bytes of write-ahead log written since the slot's last advance (what the next
        collect reads, every table's writes included); None when there is no slot."""
        value = self._one(self.sql_backlog, [self.name])
        return None if value is None else int(value)

    def require(self) -> None:
        """Refuse, in one line, when the slot or the publication is missing."""
        if not (self.exists() and self._one(self.sql_publication_exists, [self.publication])):
            raise Refused(f"The logical capture's slot {self.name} or publication "
                          f"{self.publication} is missing; run `manage.py embeddings capture "
                          "TARGET` (it creates them outside any transaction).")

    def ensure(self) -> None:
        """Create the publication, then the slot (so that every change the slot decodes sees
        the publication), if missing. Runs on a connection of its own, in autocommit; refuses
        in one line when the server cannot (its ``wal_level``, the role's privileges, a
        transaction in flight past ``DDL_LOCK_TIMEOUT``)."""
        from .capture import own_connection  # lazy: capture imports this module

        other = own_connection(self.connection.alias)
        try:
            slot = CaptureSlot(other)
            level = slot.wal_level()
            if level != "logical":
                raise Refused(f'EMBEDDINGS["CHANGE_CAPTURE"] is "logical" but the server runs '
                              f"wal_level = {level}; set wal_level = logical (a restart) or use "
                              "the trigger (CHANGE_CAPTURE = True).")
            with other.cursor() as cursor:
                cursor.execute(f"SET lock_timeout = '{DDL_LOCK_TIMEOUT}'")
                try:
                    cursor.execute(self.sql_publication_exists, [self.publication])
                    if not cursor.fetchone()[0]:
                        cursor.execute(self.sql_create_publication.format(
                            publication=qn(self.publication)))
                    if not slot.exists():
                        cursor.execute(self.sql_create_slot, [self.name])
                except DatabaseError as exc:  # a lock timeout, a privilege, the slots' limit
                    raise Refused(f"Could not create the logical capture's slot {self.name}: "
                                  f"{str(exc).strip()} (creating a slot waits for the "
                                  "transactions in flight and needs the REPLICATION "
                                  "privilege).") from exc
        finally:
            other.close()

    # PostgreSQL 16+: a record of the transactions running, which logical decoding needs to
    # move a slot's restart point (the log every read of the slot decodes from). The
    # background writer logs one every 15 s; a collect logs one before it reads, so the next
    # collect decodes from about here, not from up to 15 s of log (and more) before.
    sql_log_running = "SELECT pg_log_standby_snapshot()"
    _cannot_log_running: ClassVar[set[str]] = set()  # databases whose role may not (logged once)

    def log_running_transactions(self, raw: Any) -> None:
        """``sql_log_running`` on ``raw`` (a psycopg connection in autocommit), where the server
        has it and the role may call it (superusers, or a grant of EXECUTE); else nothing."""
        if self.connection.pg_version < 160000 or self.name in self._cannot_log_running:
            return
        try:
            raw.execute(self.sql_log_running)
        except psycopg.Error as exc:  # e.g. insufficient privilege: the bgwriter's do instead
            self._cannot_log_running.add(self.name)
            logger.info("The logical capture cannot log running transactions (%s); the "
                        "slot's restart point moves with the background writer's records.",
                        str(exc).strip())

    def drop_if_unused(self) -> None:
        """Drop the slot and the publication when no table is left in it (after a commit)."""
        if self._one(self.sql_publication_tables, [self.publication]):
            return
        if not (self.exists() or self._one(self.sql_publication_exists, [self.publication])):
            return  # never created (the trigger's way)
        try:
            self.drop_slot()
        except OperationalError as exc:  # still being read after 5 s
            logger.warning("The slot %s is unused but could not be dropped (%s); the next "
                           "collect drops it.", self.name, exc)
            return
        with self.connection.cursor() as cursor:
            cursor.execute(self.sql_drop_publication.format(publication=qn(self.publication)))

    def drop_slot(self, attempts: int = 50) -> None:
        """Drop the slot if it exists, waiting (up to ``attempts`` times 0.1 s) for a reader
        that holds it to finish."""
        for attempt in range(attempts):
            try:
                with self.connection.cursor() as cursor:
                    cursor.execute(self.sql_drop_slot, [self.name])
                return
            except OperationalError:  # "is active for PID n": a collect is reading it
                if attempt == attempts - 1:
                    raise
                time.sleep(0.1)


# The comment on a change queue: how leftovers of a target are found again (``drop_leftovers``).
CAPTURE_COMMENT = "embeddings_app change queue of {target}"


def _bounded(base: str, suffix: str) -> str:
    """``base + suffix``, shortened with a checksum of ``base`` to PostgreSQL's identifier
    length."""
    name = base + suffix
    if len(name) <= MAX_IDENTIFIER_LENGTH:
        return name
    digest = f"{zlib.crc32(base.encode()):08x}"
    return f"{base[:MAX_IDENTIFIER_LENGTH - len(suffix) - 9]}_{digest}{suffix}"


STORES: dict[str, type[VersionStore]] = {store.layout: store for store in (ColumnStore, TableStore)}


def store_class(layout: str) -> type[VersionStore]:
    try:
        return STORES[layout]
    except KeyError:
        raise Refused(f'Unknown layout "{layout}"; choose one of {", ".join(LAYOUTS)}.') from None


def store_for(version: EmbeddingVersion, field: VersionedEmbedding | None = None) -> VersionStore:
    if version.chunk_tokens:  # a chunked version (table layout only: ``lifecycle.add``)
        return ChunkStore(version, field)
    return store_class(version.layout)(version, field)


# --- several versions at once ---------------------------------------------------------------
def lock_rows(field: VersionedEmbedding, pks: Sequence[Any]) -> dict[Any, str]:
    """Lock the user's rows of ``pks`` (in primary-key order, so two writers never deadlock)
    in the caller's transaction: pk -> the row's version (``xmin``) for each row still there.
    One statement with the keys as one array parameter. ``FOR NO KEY UPDATE``, the lock an
    ``UPDATE`` of the vector columns takes anyway: updates and deletes of the rows wait for the
    caller's commit, a foreign key's check from another table (``FOR KEY SHARE``) does not."""
    if not pks:
        return {}
    pk_column = qn(field.model._meta.pk.column)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {pk_column}, xmin::text FROM {qn(field.table)} "
            f"WHERE {pk_column} = ANY(%s::{pk_db_type(field)}[]) "
            f"ORDER BY {pk_column} FOR NO KEY UPDATE",
            [list(pks)],
        )
        return dict(cursor.fetchall())


def stored_hashes(
    field: VersionedEmbedding, versions: Sequence[EmbeddingVersion], pks: Sequence[Any]
) -> dict[Any, tuple[bytes | None, ...]]:
    """pk -> the stored source hash of each version (None where never embedded)."""
    if not versions or not pks:
        return {}
    columns = ", ".join(store_for(version, field).hash_sql("t") for version in versions)
    pk_column = qn(field.model._meta.pk.column)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT t.{pk_column}, {columns} FROM {qn(field.table)} AS t "
            f"WHERE t.{pk_column} = ANY(%s)",
            [list(pks)],
        )
        return {
            row[0]: tuple(bytes(value) if value is not None else None for value in row[1:])
            for row in cursor.fetchall()
        }


def drop_leftovers(field: VersionedEmbedding) -> None:
    """Drop every version store of ``field``, whatever version records say: the columns of its
    table that are not model fields, the tables marked as stores of its target, and its change
    capture. For the tests, the demo's reset and the benchmarks, which delete the version
    records too."""
    model_columns = {f.column for f in field.model._meta.concrete_fields}
    ChangeQueue(field).remove()  # and the logical capture's slot, when no table is left in it
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind = 'r' AND n.nspname = current_schema() "
            "AND obj_description(c.oid, 'pg_class') LIKE %s ORDER BY c.relname",
            [STORE_COMMENT.format(target=field.target, version="%")],
        )
        for (table,) in cursor.fetchall():
            cursor.execute(f"DROP TABLE IF EXISTS {qn(table)}")
        for column in sorted(existing_columns(field.table) - model_columns):
            cursor.execute(f"ALTER TABLE {qn(field.table)} DROP COLUMN {qn(column)}")


def storage_sizes(field: VersionedEmbedding, versions: Sequence[EmbeddingVersion]) -> dict[str, int]:
    """Bytes on disk (heap, TOAST and indexes) of ``field``'s table and of the tables of its own
    that each of ``versions`` occupies."""
    relations = [field.table] + [name for version in versions
                                 for name in store_for(version, field).relations()]
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT name, coalesce(pg_total_relation_size(to_regclass(quote_ident(name))), 0) "
            "FROM unnest(%s::text[]) AS name", [relations])
        return {name: int(size) for name, size in cursor.fetchall()}
