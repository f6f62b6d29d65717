"""Chunked versions: a version that embeds a row's text as chunks, one vector per chunk, and
searches rows by their best chunk.

A model reads at most its token limit and drops the rest of a row (``truncation``); a chunked
version reads all of it. Chunking belongs to the version, not to the row: a new model often has
another limit, so the chunking parameters are stored on ``EmbeddingVersion`` (``chunk_tokens``,
``chunk_overlap``) and set once by ``embeddings add TARGET VERSION --model ALIAS --chunks TOKENS
[--overlap TOKENS]`` (``--chunk-overlap`` is the same option).

Invariants:

* **Where.** A chunked version lives in the side-table layout only (``stores.ChunkStore``, a
  ``TableStore``): its table ``<table>_<field>_<version>`` holds the chunks, keyed by (row key,
  ``chunk_no``), each with its ``chunk_hash``, its ``start_char``/``end_char`` offsets in the
  row's source text and its vector; the HNSW index is over chunks. A second table of its own,
  ``<table>_<field>_<version>__rows``, holds one record per row: the row's source hash and the row
  version (``xmin``) it was written against, exactly what a whole-row side table holds beside its
  vector. So freshness, coverage, stale rows, change capture and the catch-up pass read the same
  per-row hash as for any version. Both tables reference the user's table ``ON DELETE CASCADE``;
  ``drop`` drops both.
* **How text is cut.** With the model's own tokenizer (its ``tokenizers.Tokenizer``, truncation
  and padding off), by ``semantic-text-splitter`` (PyPI, a Rust library with Python bindings,
  pinned in requirements/base.txt): a chunk holds at most ``chunk_tokens`` tokens not counting
  the model's special tokens, and neighbouring chunks overlap by at most ``chunk_overlap``
  tokens. It splits at the coarsest Unicode boundary that fits (sentences, then words, then
  characters) and fills a chunk with as many of those units as fit, so a sentence is cut only
  when it alone exceeds the size or to fill the rest of a chunk; chunks are trimmed of
  surrounding whitespace. Chosen over semchunk (its token counter is a Python callback per
  piece, slower on long rows) and langchain-text-splitters (a framework dependency for one
  function), both on PyPI too, because it takes a Hugging Face tokenizer natively and returns
  each chunk's character offset. A chunk is exactly ``text[start_char:end_char]`` of the row's
  source text. ``add`` refuses a size that, with the special tokens and the document prompt,
  exceeds the model's ``max_seq_length`` (the chunk would itself be truncated), an overlap not
  below the size, and an alias without a local tokenizer (an API alias).
* **Writes.** A row is re-embedded when its source hash changed (as for any version); then only
  its chunks whose text hash is not already stored for that row are encoded. The others keep
  their stored vectors (reused in SQL by hash, whatever their number was); a chunk whose number,
  hash and offsets are unchanged is not written at all. The write is the side table's
  compare-and-set (``ChunkStore.write``): the user's rows are locked ``FOR SHARE`` and a row is
  written only while it is still the version its text was read from; a row whose reused vector
  vanished meanwhile is left out, as a conflict, and found stale later. Backfill, dual-write on
  save, ``sync`` and the change-capture sweep all go through ``sync.prepare``/``write_prepared``.
* **Search.** ``search()`` over a chunked version returns the ``k`` best *distinct* rows, ranked by
  the distance of their best chunk (``.distance``), each with ``.chunk`` (``Chunk``: number,
  offsets and text of the best chunk in the row's current source text). The nearest chunks are
  read with ``LIMIT n`` through the HNSW index with pgvector's iterative scan on
  (``hnsw.iterative_scan = strict_order``, so the scan goes past ``ef_search`` until ``n`` chunks
  come back, in exact distance order); ``n`` starts at ``CANDIDATES_PER_ROW`` x k and grows
  until ``k`` distinct rows are among them or the chunks run out. The best chunk per row and the
  rows themselves come in the same statement (one round trip per round) for a queryset that
  loads whole model instances, as a plain search's does. A queryset's filter narrows
  the chunks scanned (``key IN (the queryset's keys)``). Without an index the same query is an
  exact scan: the result equals brute force over the stored chunks.
* **Verify** compares a random sample of stored chunks with the model's embedding of the same
  span of the row's current text (``ChunkStore.sample``).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from django.db import connections, models
from django.db.models.expressions import Col

from . import stores
from .exceptions import Refused
from .sources import source_hash

if TYPE_CHECKING:
    from .config import ModelSpec
    from .encoders import Encoder
    from .models import EmbeddingVersion

__all__ = ["CANDIDATES_PER_ROW", "Chunk", "ChunkRow", "check_parameters", "cut", "nearest_rows",
           "plan_rows"]

# Chunks read per wanted row at first; multiplied by 4 until k distinct rows are found.
CANDIDATES_PER_ROW = 4
GROWTH = 4


@dataclass(frozen=True)
class Chunk:
    """The chunk of a row that matched a search: ``text == source_text[start:end]``."""

    number: int
    start: int
    end: int
    text: str


# One chunk as written: (chunk number, hash of its text, start, end, vector or None when the
# row's stored chunk of the same hash keeps its vector).
ChunkRow = tuple[int, bytes, int, int, "np.ndarray | None"]


# --- cutting --------------------------------------------------------------------------------
def _backend_tokenizer(encoder: Encoder) -> Any:
    """The model's ``tokenizers.Tokenizer`` (a fast Hugging Face tokenizer's backend), or None."""
    model = getattr(encoder, "model", None)
    tokenizer = getattr(model, "tokenizer", None) if model is not None else None
    return getattr(tokenizer, "backend_tokenizer", None)


def _token_budget(spec: ModelSpec, encoder: Encoder) -> tuple[int, int, int]:
    """(max_seq_length, special tokens added per input, tokens of the document prompt)."""
    backend = _backend_tokenizer(encoder)
    limit = getattr(encoder.model, "max_seq_length", None)  # type: ignore[attr-defined]
    specials = len(backend.encode("", add_special_tokens=True).ids)
    prompt = spec.document_prompt or ""
    prompt_tokens = len(backend.encode(prompt, add_special_tokens=False).ids) if prompt else 0
    return int(limit or 0), specials, prompt_tokens


def check_parameters(spec: ModelSpec, encoder: Encoder, tokens: Any, overlap: Any) -> tuple[int, int]:
    """Refuse chunking parameters the model cannot honour (module docstring); returns them."""
    if _backend_tokenizer(encoder) is None or not getattr(encoder, "model", None):
        raise Refused(f'Chunks are cut with the model\'s own tokenizer and alias "{spec.alias}" '
                      f"({spec.provider}) has no local fast tokenizer here; add the version "
                      "without chunks, or use a sentence-transformers alias.", option="chunks")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise Refused(f"The chunk size must be a positive number of tokens, not {tokens!r}.",
                      option="chunks")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < tokens:
        raise Refused(f"The chunk overlap must be at least 0 and below the chunk size {tokens}, not "
                      f"{overlap!r}.", option="overlap")
    limit, specials, prompt_tokens = _token_budget(spec, encoder)
    room = limit - specials - prompt_tokens
    if limit <= 0 or tokens > room:
        raise Refused(f'A chunk of {tokens} tokens does not fit alias "{spec.alias}": its model '
                      f"reads {limit} tokens, {specials} of them special"
                      + (f" and {prompt_tokens} the document prompt" if prompt_tokens else "")
                      + f", so the chunk would be truncated; use {max(room, 1)} tokens or fewer.",
                      option="chunks")
    return tokens, overlap


_splitters: dict[tuple[str, int, int], Any] = {}
_splitters_lock = threading.Lock()


def _splitter(version: EmbeddingVersion, encoder: Encoder) -> Any:
    """The version's splitter, built once per process and model files (fingerprint)."""
    key = (encoder.fingerprint, int(version.chunk_tokens or 0), int(version.chunk_overlap))
    with _splitters_lock:
        found = _splitters.get(key)
        if found is None:
            from semantic_text_splitter import TextSplitter  # lazy: only chunked versions cut
            from tokenizers import Tokenizer

            backend = _backend_tokenizer(encoder)
            if backend is None:
                raise Refused(f"{version} is chunked but its model has no fast tokenizer to cut "
                              "text with; add a version of another alias.")
            tokenizer = Tokenizer.from_str(backend.to_str())  # a copy: its own settings
            tokenizer.no_truncation()
            tokenizer.no_padding()
            found = TextSplitter.from_huggingface_tokenizer(tokenizer, key[1], key[2])
            _splitters[key] = found
    return found


def cut(version: EmbeddingVersion, encoder: Encoder, text: str) -> list[Chunk]:
    """``text`` cut into the version's chunks (none for a blank text)."""
    if not text.strip():
        return []
    return [Chunk(number, start, start + len(piece), piece) for number, (start, piece)
            in enumerate(_splitter(version, encoder).chunk_indices(text))]


# --- writes ---------------------------------------------------------------------------------
def plan_rows(version: EmbeddingVersion, encoder: Encoder, store: stores.ChunkStore,
              pks: Sequence[Any], texts: dict[Any, str],
              encode: Any) -> tuple[dict[Any, list[ChunkRow]], dict[Any, str], int]:
    """The chunks of the rows ``pks`` (each with text) to write, encoding only those whose hash
    the row does not have stored already. ``encode(keys, texts)`` is ``sync``'s isolating encode
    (-> vectors by key, error by key). Returns (chunks by row, error by failed row, chunks
    encoded)."""
    cuts = {pk: cut(version, encoder, texts[pk]) for pk in pks}
    stored = store.stored_chunk_hashes(list(cuts))
    wanted: dict[tuple[Any, bytes], str] = {}  # (row, chunk hash) -> text to encode, once per row
    hashes: dict[Any, list[bytes]] = {}
    for pk, chunks in cuts.items():
        hashes[pk] = [source_hash(chunk.text) for chunk in chunks]
        have = stored.get(pk, set())
        for chunk, digest in zip(chunks, hashes[pk], strict=True):
            if digest not in have:
                wanted.setdefault((pk, digest), chunk.text)
    vectors, errors = encode(list(wanted), wanted)
    failed = {key[0]: error for key, error in errors.items()}
    planned: dict[Any, list[ChunkRow]] = {}
    for pk, chunks in cuts.items():
        if pk in failed:
            continue
        planned[pk] = [(chunk.number, digest, chunk.start, chunk.end, vectors.get((pk, digest)))
                       for chunk, digest in zip(chunks, hashes[pk], strict=True)]
    return planned, failed, len(vectors)


# --- search ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _row_reader(model: type[models.Model], alias: str) -> tuple[tuple[str, ...], tuple[Any, ...]]:
    """The attnames of ``model``'s concrete fields (the columns ``nearest_rows_sql`` selects
    first, in this order) and the database converters of each, as the ORM applies them."""
    fields = model._meta.concrete_fields
    db = connections[alias]
    converters = []
    for index, model_field in enumerate(fields):
        expression = Col(model._meta.db_table, model_field)
        funcs = expression.get_db_converters(db)
        if funcs:
            converters.append((index, tuple(funcs), expression))
    return tuple(f.attname for f in fields), tuple(converters)


def nearest_rows(field: Any, store: stores.ChunkStore, base: models.QuerySet, literal: str,
                 k: int, *, plain_rows: bool = False) -> list[Any]:
    """The ``k`` rows of ``base`` whose best chunk is nearest to the query (``literal``), best
    first, each with ``.distance`` and ``.chunk`` (module docstring).

    ``plain_rows``: ``base`` returns model instances with every field and nothing else (no
    ``only()``, ``select_related()``, annotations): then the chunks and the rows come in one
    statement per round, built into instances as the ORM builds them (converters included);
    otherwise the rows are read through ``base``."""
    where, params = "", []
    if plain_rows:
        if base.query.has_filters():
            keys_sql, keys_params = base.values("pk").query.sql_with_params()
            where, params = keys_sql, list(keys_params)
        sql = store.nearest_rows_sql(where)
        alias = base.db  # asks the database routers: once, not once per row
        db = connections[alias]
        names, converters = _row_reader(field.model, alias)
        width = len(names)
        limit = CANDIDATES_PER_ROW * k
        while True:
            with db.cursor() as cursor:
                cursor.execute(sql, [literal, *params, literal, limit, k])
                rows = cursor.fetchall()
            read = rows[0][-1] if rows else 0
            if len(rows) >= k or read < limit:
                break
            limit *= GROWTH
        found = []
        for row in rows:
            obj = field.model.from_db(alias, names, stores.converted(row[:width], converters, db))
            number, start, end, obj.distance = row[width:width + 4]
            obj.chunk = Chunk(number, start, end, field.source_text(obj)[start:end])
            found.append(obj)
        return found
    sliced = base.query.is_sliced
    if base.query.has_filters() or sliced or base.query.distinct:
        keys_sql, keys_params = base.values("pk").query.sql_with_params()
        where, params = keys_sql, list(keys_params)
    limit = CANDIDATES_PER_ROW * k
    while True:
        rows = store.nearest_chunks(literal, where, params, limit)
        best: dict[Any, tuple[float, int, int, int]] = {}
        for key, number, start, end, distance in rows:
            best.setdefault(key, (distance, number, start, end))  # rows come nearest first
        if len(best) >= k or len(rows) < limit:
            break
        limit *= GROWTH
    ranked = sorted(best.items(), key=lambda item: (item[1][0], stores._sort_key(item[0])))[:k]
    # A sliced queryset cannot be filtered again: its rows are read by key (its keys were
    # already the filter above).
    rows_of = base.model._base_manager.using(base.db) if sliced else base
    objects = {obj.pk: obj for obj in rows_of.filter(pk__in=[key for key, _ in ranked])}
    results = []
    for key, (distance, number, start, end) in ranked:
        obj = objects.get(key)
        if obj is None:  # deleted since the chunks were read
            continue
        obj.distance = distance
        obj.chunk = Chunk(number, start, end, field.source_text(obj)[start:end])
        results.append(obj)
    return results
