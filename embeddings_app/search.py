"""Reads: the active version (or, in a gradual rollout, perhaps its candidate: ``rollout``), its
model for the query and its store for the vectors.

Invariant: one search takes one snapshot of the target (``active.snapshot``), picks one version
of it and uses that version for both the query's embedding and the store searched, so a result
is never a mix of two versions.
The async calls (``asearch``, ``asearch_vector``) run the whole sync search as one call in
Django's thread for the caller's async context (``sync_to_async``, thread-sensitive, as Django's
own async ORM methods do): the same snapshot, the same connection, the same guarantees; under
ASGI each request has its own thread, so concurrent requests search concurrently.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from asgiref.sync import sync_to_async
from django.core.exceptions import EmptyResultSet, FullResultSet
from django.db import connection, connections, models

from . import active, chunking, encoders, limits, rollout, shadow
from .exceptions import Refused, VersionMismatch
from .models import EmbeddingVersion
from .stores import ChunkStore, VersionStore, converted

if TYPE_CHECKING:
    from .fields import VersionedEmbedding


def search(field: VersionedEmbedding, text: str, *, k: int = 10,
           queryset: models.QuerySet | None = None, key: Any = None) -> list[Any]:
    check_arguments(field, k, queryset)
    started = time.perf_counter()
    snapshot = active.snapshot(field.target)
    # The version serving this search: the active one, or in a gradual rollout perhaps the
    # candidate (sticky per ``key``). Its model embeds the query, its store is searched.
    version = rollout.serving(snapshot, field.target, key)
    query_vector = encoders.for_version(version).encode_query(text)
    results = _nearest(field, version, query_vector, k, queryset)
    seconds = time.perf_counter() - started
    if snapshot.rollout is not None:  # reads per version are counted during a rollout
        rollout.note_read(version, seconds)
    elif rollout.has_pending():  # the counts of a rollout that has ended (once)
        rollout.flush()
    if queryset is None:  # a plain search may be shadowed by a candidate version (shadow.py)
        shadow.maybe_shadow(field, snapshot.shadow, version, text, k, results, seconds)
    return results


def search_vector(field: VersionedEmbedding, vector: Any, *, version: str | None = None,
                  k: int = 10, queryset: models.QuerySet | None = None) -> list[Any]:
    snapshot = active.snapshot(field.target)
    current = snapshot.active
    serving = [current] + ([snapshot.rollout] if snapshot.rollout is not None else [])
    if version is None:
        raise VersionMismatch(
            f"search_vector needs the version the vector was made with; {field.target} "
            f'searches version "{current.version}" ({current.model_label}).'
        )
    chosen = next((v for v in serving if v.version == version), None)
    if chosen is None:
        raise VersionMismatch(
            f'The vector is of version "{version}" but {field.target} searches version '
            f'"{current.version}"; embed the query with {current.model_label} or use search().'
        )
    check_arguments(field, k, queryset)
    array = limits.query_vector(vector, chosen.dimensions, chosen.version)
    return _nearest(field, chosen, array, k, queryset)


async def asearch(field: VersionedEmbedding, text: str, *, k: int = 10,
                  queryset: models.QuerySet | None = None, key: Any = None) -> list[Any]:
    """``search`` for async code (module docstring): one snapshot per search."""
    return await sync_to_async(search, thread_sensitive=True)(field, text, k=k, queryset=queryset,
                                                              key=key)


async def asearch_vector(field: VersionedEmbedding, vector: Any, *, version: str | None = None,
                         k: int = 10, queryset: models.QuerySet | None = None) -> list[Any]:
    """``search_vector`` for async code: ``VersionMismatch`` unless ``version`` is active."""
    return await sync_to_async(search_vector, thread_sensitive=True)(
        field, vector, version=version, k=k, queryset=queryset)


def check_arguments(field: VersionedEmbedding, k: Any, queryset: Any) -> None:
    """``k`` in 1..``limits.MAX_K``; ``queryset`` (if given) a queryset of the field's model."""
    limits.integer("k", k, 1, limits.MAX_K)
    if queryset is not None and (not isinstance(queryset, models.QuerySet)
                                 or queryset.model is not field.model):
        what = (queryset.model._meta.label if isinstance(queryset, models.QuerySet)
                else type(queryset).__name__)
        raise Refused(f"search(queryset=...) must be a queryset of {field.model._meta.label}, "
                      f"not of {what}.")


def _nearest(field: VersionedEmbedding, version: EmbeddingVersion, vector: np.ndarray, k: int,
             queryset: models.QuerySet | None) -> list[Any]:
    base = queryset if queryset is not None else field.model._default_manager.all()
    filtered = base.query.has_filters()
    db = connections[base.db]
    # Inside the caller's transaction: SET LOCAL, gone when it ends. In autocommit: session
    # settings sent only when they differ from what this connection already has, so a steady
    # stream of searches costs one round trip each, like the raw SQL.
    store = version.store
    _set_search_parameters(db, version, filtered=filtered, local=db.in_atomic_block, k=k,
                           store=store)
    if isinstance(store, ChunkStore):  # the k best distinct rows by their best chunk
        results = chunking.nearest_rows(field, store, base, vector_literal(vector), k,
                                        plain_rows=_selects_model_rows(base))
        for obj in results:
            obj.embedding_version = version.version
        return results
    compiled = None
    where: tuple[str, list[Any]] | None = None
    if _is_plain(base):
        compiled = _compiled_search(db.alias, field.model, store, k, False)
        where = ("", [])
    elif version.storage != "bit":  # a bit version's filter also narrows its candidates: ORM
        try:
            where = _filter_where(base, db.alias)
        except EmptyResultSet:  # e.g. filter(pk__in=[]): nothing can match, nothing to send
            return []
        if where is not None:
            compiled = _compiled_search(db.alias, field.model, store, k, True)
    if compiled is not None and where is not None:
        results = _run_compiled(db, field.model, compiled, vector, *where)
    else:
        results = list(store.search_queryset(base, vector_literal(vector), k)[:k])
    for obj in results:
        obj.embedding_version = version.version
    return results


def _is_plain(queryset: models.QuerySet) -> bool:
    """A default manager's queryset that selects every row and every field, nothing else: its
    SQL depends only on the model, the version's store and k, so it can be compiled once."""
    query = queryset.query
    return not query.has_filters() and _selects_model_rows(queryset)


def _selects_model_rows(queryset: models.QuerySet) -> bool:
    """``queryset`` returns model instances with every field, one per row of the model's table,
    and its only clause (if any) is a WHERE: what the compiled search can stand in for. (An
    ORDER BY is allowed: the search's order by distance replaces it, on either path.)"""
    query = queryset.query
    return not (query.annotations or query.extra or query.extra_tables or query.select_related
                or query.combinator or query.deferred_loading[0] or query.distinct
                or query.low_mark or query.high_mark is not None or query.select_for_update
                or query.values_select or queryset._prefetch_related_lookups
                or queryset._iterable_class is not models.query.ModelIterable)


def _filter_where(queryset: models.QuerySet, alias: str) -> tuple[str, list[Any]] | None:
    """The WHERE of a filtered ``queryset`` as SQL and parameters, compiled by the ORM, when it
    names no table but the model's own (no join, no annotation, nothing but a WHERE: checked),
    so it can be ANDed into the compiled search; None otherwise (the ORM path runs).
    Raises ``EmptyResultSet`` for a WHERE that matches nothing."""
    query = queryset.query
    table = queryset.model._meta.db_table
    if not _selects_model_rows(queryset) or any(name != table for name in query.alias_map):
        return None
    compiler = query.get_compiler(using=alias)
    try:
        sql, params = compiler.compile(query.where)
    except FullResultSet:  # a WHERE that matches every row
        return "TRUE", []
    return sql or "TRUE", list(params)


# Where the compiled filtered search puts the queryset's WHERE (an extra condition of the query
# compiled once; replaced by the WHERE each call, in parentheses, ANDed with the rest).
_FILTER_MARK = "embeddings_app_queryset_filter"


@dataclass(frozen=True)
class _CompiledSearch:
    """The SQL of a search and how to turn its rows into model instances."""

    head: str  # up to the queryset's WHERE (a filtered search) or the whole SQL (a plain one)
    tail: str  # after it; no parameter: the query vector is the head's only one
    field_names: tuple[str, ...]  # attnames of the model's columns, first in the select list
    distance_index: int
    converters: tuple[tuple[int, tuple[Callable[..., Any], ...], Any], ...]


@functools.lru_cache(maxsize=256)
def _compiled_search(alias: str, model: type[models.Model], store: VersionStore,
                     k: int, filtered: bool) -> _CompiledSearch | None:
    """Compile the ORM's search query once (with a stand-in vector and, if ``filtered``, a
    stand-in for the queryset's WHERE); None if its SQL does not have the query vector as its
    only parameter, before the WHERE's place (then the ORM path runs every time). Stores are
    equal when their search SQL is (``VersionStore.search_key``)."""
    dimensions = int(store.version.dimensions)
    base = model._base_manager.using(alias).all()
    if base.query.has_filters():
        return None
    if filtered:
        base = base.extra(where=[_FILTER_MARK])
    queryset = store.search_queryset(base, vector_literal(np.zeros(dimensions, dtype=np.float32)),
                                     k)[:k]
    compiler = queryset.query.get_compiler(using=alias)
    sql, params = compiler.as_sql()
    if len(params) != 1:
        return None
    head, tail = sql, ""
    if filtered:
        parts = sql.split(_FILTER_MARK)
        if len(parts) != 2:
            return None
        head, tail = parts
    if head.count("%s") != 1 or "%s" in tail:
        return None
    klass_info = compiler.klass_info
    if klass_info is None or list(klass_info["select_fields"]) != list(
            range(len(klass_info["select_fields"]))):
        return None
    field_names = tuple(compiler.select[i][0].target.attname for i in klass_info["select_fields"])
    converters = compiler.get_converters([expr for expr, _, _ in compiler.select])
    return _CompiledSearch(
        head=head, tail=tail, field_names=field_names,
        distance_index=compiler.annotation_col_map["distance"],
        converters=tuple((i, tuple(funcs), expr) for i, (funcs, expr) in converters.items()),
    )


def _run_compiled(db: Any, model: type[models.Model], compiled: _CompiledSearch,
                  vector: np.ndarray, where: str, where_params: list[Any]) -> list[Any]:
    """The search without rebuilding the queryset: the SQL the ORM compiled once, the query
    vector as its first parameter and the queryset's WHERE (if any) in its place, instances
    built as Django's own iterable builds them."""
    with db.cursor() as cursor:
        cursor.execute(compiled.head + where + compiled.tail,
                       [vector_literal(vector), *where_params])
        rows = cursor.fetchall()
    width = len(compiled.field_names)
    results = []
    for row in rows:
        row = converted(row, compiled.converters, db)
        obj = model.from_db(db.alias, compiled.field_names, row[:width])
        obj.distance = row[compiled.distance_index]
        results.append(obj)
    return results


def vector_literal(vector: np.ndarray) -> str:
    """pgvector's text form of ``vector``, each float32 to 9 significant digits: the fewest that
    always parse back to the same float32, formatted in one C call (about 3x faster and 40%
    shorter than ``str()`` of each float)."""
    values = np.asarray(vector, dtype=np.float32).tolist()
    return _literal_format(len(values)) % tuple(values)


@functools.lru_cache(maxsize=16)
def _literal_format(dimensions: int) -> str:
    return "[" + ",".join(["%.9g"] * dimensions) + "]"


def _set_search_parameters(db: Any, version: EmbeddingVersion, *, filtered: bool,
                           local: bool, k: int = 10, store: VersionStore | None = None) -> None:
    """Set the HNSW search parameters of ``version`` on ``db``.

    ``hnsw.ef_search`` is the version's ``hnsw_ef_search``. A filtered query (a ``queryset`` with
    a WHERE clause) also turns on pgvector 0.8's iterative index scan in ``strict_order`` mode, so
    a selective filter still returns ``k`` rows, in exact distance order.

    A bit version's Hamming index must give ``store.rerank_candidates(k)`` rows: its ef_search
    is at least that (up to 1,000), and a filtered search, or one needing more candidates than
    1,000, scans iteratively in ``relaxed_order`` (the candidates are re-ranked exactly after).
    """
    ef_search, iterate = (store or version.store).search_settings(int(version.hnsw_ef_search), k)
    wanted = {"hnsw.ef_search": str(ef_search)}
    if supports_iterative_scan(db):
        if version.storage == "bit":
            wanted["hnsw.iterative_scan"] = "relaxed_order" if filtered or iterate else "off"
        else:
            # A chunked version (``iterate``) always: its k rows may need more chunks.
            wanted["hnsw.iterative_scan"] = "strict_order" if filtered or iterate else "off"
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
