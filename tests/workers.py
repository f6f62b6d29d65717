"""Real ``celery worker`` processes on the database and broker of this process: started by the
tests' ``celery_worker`` fixture and by the benchmarks (``benchmarks/backfill.py``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parent.parent


def database_url() -> str:
    """A URL of the database Django uses here (the test database under pytest), for
    subprocesses."""
    conf = connection.settings_dict
    host = quote(conf.get("HOST") or "", safe="")
    port = f":{conf['PORT']}" if conf.get("PORT") else ""
    password = f":{quote(conf['PASSWORD'], safe='')}" if conf.get("PASSWORD") else ""
    return f"postgres://{quote(conf['USER'], safe='')}{password}@{host}{port}/{conf['NAME']}"


class WorkerProcess:
    """A real ``celery worker`` process (prefork pool) serving ``queue`` (default: the embeddings
    queue of the settings). ``extra_env`` adds variables; a value of None removes one (e.g.
    ``OMP_NUM_THREADS``). ``app``: the Celery app module (``celery -A``)."""

    def __init__(self, concurrency: int = 2, extra_env: dict[str, str | None] | None = None,
                 log_path: Path | None = None, queue: str | None = None, name: str = "test",
                 ready_timeout: float = 90, app: str = "project") -> None:
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": os.environ.get("DJANGO_SETTINGS_MODULE", "tests.settings"),
            "DATABASE_URL": database_url(),
            "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
            "HF_HUB_OFFLINE": "1",
        }
        for key, value in (extra_env or {}).items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        self.log_path = log_path or ROOT / "test-artifacts" / f"worker-{time.time_ns()}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", app, "worker", "-Q",
             queue or settings.EMBEDDINGS.get("QUEUE", "embeddings"), "-c", str(concurrency),
             "--pool", "prefork", "-l", "info", "--without-gossip", "--without-mingle",
             "--without-heartbeat", "-n", f"{name}-{time.time_ns()}@%h"],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self._wait_ready(ready_timeout)
        except RuntimeError:
            self.stop()  # no process left behind by a worker that did not start
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"celery worker exited early:\n{self.log()}")
            if " ready." in self.log():
                return
            time.sleep(0.2)
        raise RuntimeError(f"celery worker not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def child_pids(self) -> list[int]:
        import psutil

        return [child.pid for child in psutil.Process(self.process.pid).children(recursive=True)]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


def wait_for_run(run_id: int, timeout: float = 300, poll: float = 0.3) -> Any:
    """The ``BackfillRun`` once it is no longer running (its batches done, finalized)."""
    from embeddings_app.models import BackfillRun  # Django is set up by the time this runs

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = BackfillRun.objects.get(pk=run_id)
        if run.status != BackfillRun.Status.RUNNING:
            return run
        time.sleep(poll)
    raise AssertionError(f"backfill run {run_id} still running after {timeout}s")
