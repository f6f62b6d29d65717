"""HNSW indexes on version columns, built without blocking writes."""

from __future__ import annotations

from django.db import connection

from . import registry, storage
from .exceptions import Refused
from .models import EmbeddingVersion, State

OPCLASSES = {"vector": "vector_cosine_ops", "halfvec": "halfvec_cosine_ops"}


def index_name(version: EmbeddingVersion) -> str:
    field = registry.get(version.target)
    return f"{field.table}_{version.column}_hnsw"[: storage.MAX_IDENTIFIER_LENGTH]


def index_state(version: EmbeddingVersion) -> str:
    """"valid", "invalid" (a failed concurrent build), or "none"."""
    if version.state == State.DROPPED:
        return "none"
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT x.indisvalid FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
            "WHERE i.relname = %s",
            [index_name(version)],
        )
        row = cursor.fetchone()
    if row is None:
        return "none"
    return "valid" if row[0] else "invalid"


def build(version: EmbeddingVersion, *, m: int = 16, ef_construction: int = 64) -> str:
    """CREATE INDEX CONCURRENTLY (an INVALID leftover of a failed build is dropped first)."""
    if version.state in (State.DROPPED, State.RETIRED):
        raise Refused(f"{version} is {version.state}; its column is not kept, nothing to index.")
    if connection.in_atomic_block:
        raise Refused("index cannot run inside a transaction (it builds concurrently).")
    field = registry.get(version.target)
    name = index_name(version)
    state = index_state(version)
    if state == "valid":
        return name
    with connection.cursor() as cursor:
        if state == "invalid":
            cursor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {storage.qn(name)}")
        cursor.execute(
            f"CREATE INDEX CONCURRENTLY {storage.qn(name)} ON {storage.qn(field.table)} "
            f"USING hnsw ({storage.qn(version.column)} {OPCLASSES[version.storage]}) "
            f"WITH (m = {int(m)}, ef_construction = {int(ef_construction)})"
        )
    return name
