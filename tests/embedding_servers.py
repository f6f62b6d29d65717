"""Real OpenAI-compatible embedding servers on 127.0.0.1 for the provider tests.

* ``InfinityServer``: infinity-emb (``.venv-infinity``, built by ``make infinity``) serving the
  packaged all-MiniLM-L6-v2 folder: a real model behind a real ``/embeddings`` endpoint.
* ``FaultServer``: a small threaded HTTP server speaking the same API, with deterministic vectors,
  that injects the faults a test scripts (429 with Retry-After, 500, a timeout, a dropped
  connection), rejects inputs containing ``REJECT_MARKER`` with a 400, can change its vectors
  under the same model name (``drift``) and keeps its own request log. Nothing is patched in the
  client: the app talks to it over HTTP through the ``openai`` SDK.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import threading
import time
import urllib.request
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
INFINITY_VENV = ROOT / os.environ.get("INFINITY_VENV", ".venv-infinity")
REJECT_MARKER = "REJECT-THIS-INPUT"
FAULT_DIMENSIONS = 16


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class InfinityServer:
    """``infinity_emb v2`` serving ``model_folder`` on a free port of 127.0.0.1."""

    def __init__(self, model_folder: str, log_path: Path, ready_timeout: float = 300) -> None:
        executable = INFINITY_VENV / "bin" / "infinity_emb"
        if not executable.exists():
            raise RuntimeError(f"{executable} is missing: run `make infinity` (make test does).")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("w")
        self.log_path = log_path
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1",
               "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
        self.process = subprocess.Popen(
            [str(executable), "v2", "--model-id", model_folder, "--host", "127.0.0.1",
             "--port", str(self.port), "--engine", "torch", "--device", "cpu",
             "--no-model-warmup"],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready(ready_timeout)
        except RuntimeError:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"infinity exited early:\n{self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"infinity not ready after {timeout}s:\n"
                           f"{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()
        self._log.close()


@dataclass
class Request:
    at: float  # time.time() when the request arrived
    model: str
    inputs: int
    tokens: int
    status: int  # 0: the connection was dropped without an answer
    fault: str = ""


def bound_tokens(text: str) -> int:
    """The server's token count: the same bound the client uses without a tokenizer."""
    return len(text.encode("utf-8", "surrogatepass")) + 2


class FaultServer:
    """An OpenAI-compatible ``/embeddings`` endpoint on 127.0.0.1 that fails on demand."""

    def __init__(self, api_key: str, timeout_sleep: float = 2.0,
                 tokens_per_minute: int | None = None) -> None:
        self.api_key = api_key
        # Enforced as a provider does: a request that would take the tokens answered in the last
        # 60 seconds above this gets a 429 with Retry-After (seconds until it would fit).
        self.tokens_per_minute = tokens_per_minute
        self.timeout_sleep = timeout_sleep
        self.requests: list[Request] = []
        self._accepted: deque[tuple[float, int]] = deque()  # (time, tokens) of the last minute
        self._accepted_tokens = 0
        self.faults: deque[str] = deque()
        self.drift = False
        self.outage = False
        self.echo_key_on_reject = False
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                server._handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def script(self, *faults: str) -> None:
        """The next requests fail in this order: "429", "500", "timeout", "drop"."""
        with self._lock:
            self.faults.extend(faults)

    def requests_for(self, model: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.model == model]

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.faults.clear()
            self.drift = self.outage = self.echo_key_on_reject = False

    @staticmethod
    def vector(text: str, drift: bool) -> list[float]:
        seed = int.from_bytes(hashlib.sha256(("drift:" if drift else "") .encode()
                                             + text.encode("utf-8", "surrogatepass")).digest()[:8])
        values = np.random.default_rng(seed).normal(size=FAULT_DIMENSIONS)
        return [float(v) for v in values / np.linalg.norm(values)]

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        arrived = time.time()
        body = json.loads(handler.rfile.read(int(handler.headers.get("content-length", 0))))
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        tokens = sum(bound_tokens(text) for text in inputs)
        with self._lock:
            fault = self.faults.popleft() if self.faults else ""
            if self.outage:
                fault = "503"
        status = 200
        if handler.headers.get("authorization") != f"Bearer {self.api_key}":
            status, payload = 401, {"error": {"message": "Incorrect API key provided"}}
        elif fault == "drop":
            self._record(arrived, body, inputs, tokens, 0, fault)
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
            return
        elif fault == "timeout":
            time.sleep(self.timeout_sleep)  # longer than the client's timeout
            status, payload = 200, self._answer(body, inputs, tokens)
        elif (wait := self._over_limit(arrived, tokens)) is not None:
            status, fault = 429, f"tpm:{wait}"
            payload = {"error": {"message": "Rate limit reached for tokens per minute",
                                 "type": "tokens"}}
        elif fault in ("429", "500", "503"):
            status = int(fault)
            payload = {"error": {"message": f"injected {fault}", "type": "server_error"}}
        elif any(REJECT_MARKER in text for text in inputs):
            message = "This input is invalid: it contains a forbidden marker"
            if self.echo_key_on_reject:  # a careless server that echoes the request's key
                message += f" (request authorization: {handler.headers.get('authorization')})"
            status, payload = 400, {"error": {"message": message,
                                              "type": "invalid_request_error"}}
        else:
            payload = self._answer(body, inputs, tokens)
        self._record(arrived, body, inputs, tokens, status, fault)
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("content-type", "application/json")
        handler.send_header("content-length", str(len(data)))
        if status == 429:
            handler.send_header("retry-after", fault[4:] if fault.startswith("tpm:") else "1")
        handler.end_headers()
        with contextlib.suppress(OSError):  # the client gave up (a timeout)
            handler.wfile.write(data)

    def _over_limit(self, now: float, tokens: int) -> int | None:
        """None if ``tokens`` more fit in the last minute's accepted tokens (and then they are
        counted), else the whole seconds until they would."""
        if self.tokens_per_minute is None:
            return None
        with self._lock:
            window = self._accepted
            while window and window[0][0] <= now - 60:
                self._accepted_tokens -= window.popleft()[1]
            if self._accepted_tokens + tokens <= self.tokens_per_minute:
                window.append((now, tokens))
                self._accepted_tokens += tokens
                return None
            used = self._accepted_tokens
            for at, count in window:
                used -= count
                if used + tokens <= self.tokens_per_minute:
                    return max(1, int(at + 60 - now + 0.999))
            return 60

    def _answer(self, body: dict[str, Any], inputs: list[str], tokens: int) -> dict[str, Any]:
        return {"object": "list", "model": body["model"],
                "data": [{"object": "embedding", "index": i,
                          "embedding": self.vector(text, self.drift)}
                         for i, text in enumerate(inputs)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def _record(self, at: float, body: dict[str, Any], inputs: list[str], tokens: int,
                status: int, fault: str) -> None:
        with self._lock:
            self.requests.append(Request(at, body.get("model", ""), len(inputs), tokens, status,
                                         fault))

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def max_in_window(requests: list[Request], seconds: float) -> tuple[int, int]:
    """The most (tokens, requests) that arrived within any ``seconds`` long window."""
    times = sorted((r.at, r.tokens) for r in requests)
    most_tokens = most_requests = 0
    for i, (start, _) in enumerate(times):
        inside = [tokens for at, tokens in times[i:] if at < start + seconds]
        most_tokens = max(most_tokens, sum(inside))
        most_requests = max(most_requests, len(inside))
    return most_tokens, most_requests
