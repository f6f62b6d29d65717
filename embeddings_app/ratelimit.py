"""One rate limit per API endpoint and model, shared by every process on every machine.

The state is in PostgreSQL (the database every worker already uses): a log of the requests sent
(``ProviderUsage``: when, how many tokens) and a pause set by a 429's ``Retry-After``
(``ProviderPause``). A request is admitted under a transaction-scoped advisory lock on its key,
so two processes never both take the last of a budget.

Invariant: in every window of ``60 / n`` seconds at most ``limit / n`` tokens and requests
*reach the server* (``n`` up to 10: a sliding window over a tenth of a minute, like the providers'
own per-second enforcement), so *any* 60-second window holds at most the per-minute limit. A
request counts from when it is admitted until a full window after its answer came back (it
reached the server in between, however late its process sent it); one whose process died counts
until a window after its timeout.

The limiter uses its own database connection (autocommit): a reservation never holds a lock in,
nor is rolled back with, the caller's transaction (a dual-write inside ``save()``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from django.db import connections, router
from django.db.utils import load_backend

from .config import ModelSpec
from .exceptions import ProviderUnavailable
from .models import ProviderUsage

MAX_DIVISIONS = 10
MARGIN = 0.05  # seconds: clock rounding
IN_FLIGHT_POLL = 0.05  # seconds between looks when the room depends on a request in flight


def _divisions(limit: int) -> int:
    """The largest n <= MAX_DIVISIONS that divides ``limit``: windows of 60/n s, limit/n each."""
    return next(n for n in range(min(MAX_DIVISIONS, limit), 0, -1) if limit % n == 0)


_local = threading.local()


def _connection() -> Any:
    """This thread's own connection to the app's database (a new one after a fork)."""
    alias = router.db_for_write(ProviderUsage)
    wrapper = getattr(_local, "wrapper", None)
    if wrapper is None or _local.pid != os.getpid() or _local.alias != alias:
        settings_dict = dict(connections[alias].settings_dict)
        wrapper = load_backend(settings_dict["ENGINE"]).DatabaseWrapper(settings_dict, alias)
        _local.wrapper, _local.pid, _local.alias = wrapper, os.getpid(), alias
    wrapper.ensure_connection()
    return wrapper


@contextlib.contextmanager
def _reconnecting() -> Iterator[Any]:
    """This thread's connection; closed on any error, so the next call connects afresh (a
    restarted database server never leaves a worker with a broken limiter)."""
    wrapper = _connection()
    try:
        yield wrapper
    except Exception:
        close()
        raise


@dataclass(frozen=True)
class SharedRateLimiter:
    key: str
    tokens_per_minute: int | None
    requests_per_minute: int | None
    timeout: float = 60.0  # a request still unfinished this long after it was sent is over

    @classmethod
    def for_spec(cls, spec: ModelSpec) -> SharedRateLimiter:
        identity = f"{(spec.base_url or '').rstrip('/')}|{spec.model}"
        return cls(hashlib.sha256(identity.encode()).hexdigest()[:32], spec.tokens_per_minute,
                   spec.requests_per_minute, float(spec.timeout))

    @property
    def token_window(self) -> tuple[float, float] | None:
        """(seconds, tokens) of the token window, or None without a token limit."""
        if not self.tokens_per_minute:
            return None
        n = MAX_DIVISIONS if self.tokens_per_minute >= MAX_DIVISIONS else 1
        return 60 / n, self.tokens_per_minute / n

    @property
    def request_window(self) -> tuple[float, int] | None:
        if not self.requests_per_minute:
            return None
        n = _divisions(self.requests_per_minute)
        return 60 / n, self.requests_per_minute // n

    @property
    def max_request_tokens(self) -> int:
        """The most tokens one request may carry (a window's token budget)."""
        window = self.token_window
        return int(window[1]) if window else 1 << 62

    def acquire(self, tokens: int, max_wait: float | None = None) -> tuple[float, int | None]:
        """Wait until a request of ``tokens`` tokens may be sent and record it as in flight;
        returns (seconds waited, the record to ``finish`` once the answer is in). With
        ``max_wait``, raise ``ProviderUnavailable`` instead of waiting longer."""
        waited = 0.0
        while True:
            delay, entry = self._try(tokens)
            if delay <= 0:
                return waited, entry
            if max_wait is not None and waited + delay > max_wait:
                raise ProviderUnavailable(
                    f"The embedding API's rate limit leaves no room for {delay:.1f}s (limits: "
                    f"{self.tokens_per_minute or '-'} tokens, {self.requests_per_minute or '-'} "
                    "requests per minute); try again later.")
            time.sleep(delay)
            waited += delay

    def finish(self, entry: int | None) -> None:
        """The request of ``entry`` got its answer (or failed): its window starts ending now."""
        if entry is None:
            return
        with _reconnecting() as wrapper, wrapper.connection.cursor() as cursor:
            cursor.execute("UPDATE embeddings_app_providerusage SET done = "
                           "extract(epoch FROM clock_timestamp()) WHERE id = %s", [entry])

    def _try(self, tokens: int) -> tuple[float, int | None]:
        """Record the request and return (0, its record) if it fits now, else (the seconds to
        wait, None)."""
        with _reconnecting() as wrapper:
            return self._try_on(wrapper, tokens)

    def _try_on(self, wrapper: Any, tokens: int) -> tuple[float, int | None]:
        token_window, request_window = self.token_window, self.request_window
        horizon = max(token_window[0] if token_window else 0,
                      request_window[0] if request_window else 0) + MARGIN
        with wrapper.connection.transaction(), wrapper.connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0)), "
                           "extract(epoch FROM clock_timestamp())::float8", [self.key])
            now = cursor.fetchone()[1]
            cursor.execute("SELECT until FROM embeddings_app_providerpause WHERE key = %s",
                           [self.key])
            row = cursor.fetchone()
            if row is not None and row[0] > now:
                return row[0] - now, None
            if not (token_window or request_window):
                return 0.0, None
            # A request's entry ends a window after its answer (then it reached the server
            # before); one never finished (its process died) after its timeout.
            cursor.execute("DELETE FROM embeddings_app_providerusage WHERE key = %s AND "
                           "COALESCE(done, at + %s) < %s",
                           [self.key, self.timeout, now - horizon])
            cursor.execute("SELECT COALESCE(done, at + %s, %s), tokens FROM "
                           "embeddings_app_providerusage WHERE key = %s",
                           [self.timeout, now, self.key])
            ends = sorted(cursor.fetchall())  # (when the request's answer came, cost)
            delay = 0.0
            if token_window:
                delay = max(delay, _wait(ends, now, token_window[0], token_window[1], tokens))
            if request_window:
                delay = max(delay, _wait([(end, 1) for end, _ in ends], now, request_window[0],
                                         request_window[1], 1))
            if delay > 0:
                return delay, None
            cursor.execute("INSERT INTO embeddings_app_providerusage (key, at, tokens) "
                           "VALUES (%s, %s, %s) RETURNING id", [self.key, now, tokens])
            return 0.0, cursor.fetchone()[0]

    def pause(self, seconds: float) -> None:
        """Make every process wait ``seconds`` before its next request (a 429's Retry-After)."""
        with _reconnecting() as wrapper, wrapper.connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO embeddings_app_providerpause (key, until) VALUES "
                "(%s, extract(epoch FROM clock_timestamp()) + %s) ON CONFLICT (key) DO UPDATE "
                "SET until = GREATEST(embeddings_app_providerpause.until, EXCLUDED.until)",
                [self.key, seconds])


def _wait(ends: list[tuple[float, int]], now: float, window: float, budget: float,
          cost: int) -> float:
    """Seconds until ``cost`` more fits in the ``window``, given the (end, cost) of the requests
    in time order (an end in the future: still in flight). A request larger than the whole
    budget waits for an empty window and goes alone."""
    span = window + MARGIN
    live = [(end, used) for end, used in ends if end > now - span]
    used = sum(amount for _, amount in live)
    cost = min(cost, budget)
    if used + cost <= budget:
        return 0.0
    for end, amount in live:  # the earliest answered expire first
        if end > now:  # still in flight: look again once it may have its answer
            return IN_FLIGHT_POLL
        used -= amount
        if used + cost <= budget:
            return max(end + span - now, 0.0) + 0.001
    return 0.0  # unreachable: an empty window fits a request of at most the budget


def close() -> None:
    """Close this thread's limiter connection (tests: before the test database is dropped)."""
    wrapper = getattr(_local, "wrapper", None)
    if wrapper is not None and _local.pid == os.getpid():
        with contextlib.suppress(Exception):  # closing a broken connection may fail too
            wrapper.close()
    _local.wrapper = None
