"""What is embedded for a row: its source text, the hash stored beside its vector, and the
queries that read both. ``fields``, ``sync``, ``backfill``, ``verify`` and ``estimate`` all read
sources through this module; it imports no other module of the app that needs the app registry
(``stores`` only), so the field's module can use it at import time.

Invariants:

* ``EmbeddingSource.source_text`` is the one definition of a row's text: the source callable's
  result, or the non-empty source fields joined by ``SOURCE_SEPARATOR``. The SQL join
  (``source_text_sql``) and the join on fetched values (``source_query``) produce exactly that
  text (tests/test_backfill_internals.py checks); a subclass overriding ``source_text`` gets its
  own method called on an object carrying the source attributes.
* ``source_hash`` changes whenever the text changes; a row is *fresh* for a version when the
  hash stored by its store equals the hash of its current text.
* every read of sources is keyed by primary key, never OFFSET, and bounded in memory (keyset
  pages, or a server-side cursor read in chunks of ``SCAN_CHUNK`` rows).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from django.core.exceptions import FieldDoesNotExist
from django.db import models, transaction
from django.db.models.expressions import RawSQL

from . import stores
from .exceptions import ConfigurationError

if TYPE_CHECKING:
    from .models import EmbeddingVersion

__all__ = ["SCAN_CHUNK", "SOURCE_SEPARATOR", "EmbeddingSource", "Source", "SourceRow",
           "iter_source_pages", "scan_unfresh", "source_hash", "source_query", "source_text_sql"]

Source = Sequence[str] | Callable[[Any], str]

SOURCE_SEPARATOR = "\n\n"
SCAN_CHUNK = 2000  # rows fetched per round trip by the streaming scans

# One row as read for a refresh: (pk, source text, stored source hash of each version, the row
# version it was read from: PostgreSQL's xmin, or None when the text did not come from the table).
SourceRow = tuple[Any, str, tuple[bytes | None, ...], str | None]


def source_hash(text: str) -> bytes:
    """16 bytes that change whenever the source text changes (stored per row and version)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class EmbeddingSource:
    """The source of an embedded model's rows: a list of field names or a callable(instance).
    ``VersionedEmbedding`` is one; ``model`` and ``name`` are set when it joins its model."""

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

    @property
    def target(self) -> str:
        return f"{self.model._meta.label}.{self.name}"

    @property
    def table(self) -> str:
        return self.model._meta.db_table

    def source_text(self, instance: Any) -> str:
        """The text embedded for ``instance``: the callable's result, or the source fields joined."""
        if self._source_callable is not None:
            value = self._source_callable(instance)
            return "" if value is None else str(value)
        assert self.source_fields is not None
        # One comprehension (a chunked search calls this once per result row).
        return SOURCE_SEPARATOR.join([str(part) for name in self.source_fields
                                      if (part := getattr(instance, name)) not in (None, "")])

    source_hash = staticmethod(source_hash)

    def source_queryset(self) -> models.QuerySet:
        """Rows with just what ``source_text`` needs loaded."""
        queryset = self.model._base_manager.all()
        if self.source_fields is not None:
            queryset = queryset.only(*self.source_fields)
        return queryset


def plain_source_fields(field: EmbeddingSource) -> tuple[str, ...] | None:
    """The source fields when each is a plain column of the model, so the source text can be
    built from the column values without model instances; None for a callable or a relation."""
    if field.source_fields is None:
        return None
    for name in field.source_fields:
        try:
            model_field = field.model._meta.get_field(name)
        except FieldDoesNotExist:
            return None
        if not model_field.concrete or model_field.is_relation or model_field.attname != name:
            return None
    return field.source_fields


def _as_bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


def source_query(
    field: EmbeddingSource, versions: Sequence[EmbeddingVersion], queryset: models.QuerySet
) -> tuple[models.QuerySet, Callable[[Any], SourceRow]]:
    """``queryset`` as one query returning each row's source and its stored hash of every
    version (as each version's store reads it), and the function turning one of its results
    into a ``SourceRow``."""
    table = stores.qn(field.table)
    aliases = [f"_embeddings_stored_{index}" for index in range(len(versions))]
    annotated = queryset.annotate(**{
        alias: RawSQL(stores.store_for(version, field).hash_sql(table), ())
        for alias, version in zip(aliases, versions, strict=True)
    }, _embeddings_xmin=RawSQL(f"{table}.xmin::text", ()))
    plain = plain_source_fields(field)
    if plain is None:  # a callable source needs the model instance
        def decode_instance(obj: Any) -> SourceRow:
            return (obj.pk, field.source_text(obj),
                    tuple(_as_bytes(getattr(obj, alias)) for alias in aliases),
                    obj._embeddings_xmin)

        return annotated, decode_instance
    stored_and_version = (*aliases, "_embeddings_xmin")

    def decode_values(values: Any) -> SourceRow:
        return (values[0], values[1], tuple(_as_bytes(value) for value in values[2:-1]),
                values[-1])

    default_join = type(field).source_text is EmbeddingSource.source_text
    text_sql = source_text_sql(field, plain) if default_join else None
    if text_sql is not None:  # the text joined by PostgreSQL: less to transfer and to decode
        annotated = annotated.annotate(_embeddings_source=text_sql)
        return annotated.values_list("pk", "_embeddings_source", *stored_and_version), decode_values
    width = len(plain)
    if default_join:
        # EmbeddingSource.source_text's join, on the values without an object per row (the
        # decode was a third of a 100,000-row scan); tests/test_backfill_internals.py checks.
        def text_of(values: Any) -> str:
            return SOURCE_SEPARATOR.join(str(part) for part in values if part not in (None, ""))
    else:  # a subclass with its own source_text gets an object with the source attributes
        def text_of(values: Any) -> str:
            return field.source_text(SimpleNamespace(**dict(zip(plain, values, strict=True))))

    def decode_columns(values: Any) -> SourceRow:
        return decode_values((values[0], text_of(values[1:width + 1]), *values[width + 1:]))

    return annotated.values_list("pk", *plain, *stored_and_version), decode_columns


def source_text_sql(field: EmbeddingSource, plain: tuple[str, ...]) -> RawSQL | None:
    """``EmbeddingSource.source_text``'s join as SQL, for source fields that are all text
    columns (``str()`` of a date or a number is not PostgreSQL's text of it); None otherwise.

    The same text: the non-empty values joined by ``SOURCE_SEPARATOR``, NULL and ``""`` left
    out (``concat_ws`` skips NULLs; ``NULLIF`` makes ``""`` one)."""
    columns = [field.model._meta.get_field(name) for name in plain]
    if any(column.get_internal_type() not in ("CharField", "TextField") for column in columns):
        return None
    table = stores.qn(field.table)
    parts = ", ".join(f"NULLIF({table}.{stores.qn(column.column)}, '')" for column in columns)
    return RawSQL(f"concat_ws(%s, {parts})", (SOURCE_SEPARATOR,), output_field=models.TextField())


def iter_source_pages(
    field: EmbeddingSource, versions: Sequence[EmbeddingVersion], queryset: models.QuerySet,
    page_size: int,
) -> Iterator[tuple[list[SourceRow], bool]]:
    """Walk ``queryset`` by primary key (keyset pagination, never OFFSET), one query per page:
    (the page's rows with their stored hashes, whether it is the last page)."""
    query, decode = source_query(field, versions, queryset.order_by("pk"))
    last = None
    while True:
        page_query = query if last is None else query.filter(pk__gt=last)
        rows = [decode(result) for result in page_query[:page_size + 1]]  # +1: is there more?
        more = len(rows) > page_size
        page = rows[:page_size]
        yield page, not more
        if not more:
            return
        last = page[-1][0]


def scan_unfresh(
    field: EmbeddingSource, versions: Sequence[EmbeddingVersion], queryset: models.QuerySet,
) -> Iterator[tuple[Any, bytes, tuple[bytes | None, ...]]]:
    """Read every row of ``queryset`` in one streamed query (a server-side cursor, nothing
    proportional to the table held) and yield (pk, hash of its current source, its stored hash
    of each version) for the rows that are not fresh for one of ``versions``."""
    connection = transaction.get_connection(queryset.db)
    if connection.settings_dict.get("DISABLE_SERVER_SIDE_CURSORS"):
        # Without server-side cursors (transaction pooling) the driver would load the whole
        # result at once: keyset pages keep the memory bounded instead.
        rows: Iterable[SourceRow] = (
            row for page, _ in iter_source_pages(field, versions, queryset, SCAN_CHUNK)
            for row in page)
    else:
        query, decode = source_query(field, versions, queryset.order_by())
        rows = map(decode, query.iterator(chunk_size=SCAN_CHUNK))
    for pk, text, stored, _ in rows:
        current = field.source_hash(text)
        if any(value != current for value in stored):
            yield pk, current, stored
