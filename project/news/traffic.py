"""Live traffic for the demo: threads that keep searching, editing and inserting articles, and a
sampler of the new version's coverage, all recorded with timestamps for the report and chart.

Each search is made by one of ``USERS`` simulated users, drawn at random, and passes the user's id
as ``search(..., key=...)``: during a gradual rollout (``activate --percent``) a user stays on one
version."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

from django.db import close_old_connections, connection, transaction

from embeddings_app.models import EmbeddingVersion, State
from project.news.models import Article

TARGET = "news.Article.embedding"

SEARCH_QUERIES = [
    "central bank raises interest rates",
    "mobile phone sales",
    "football club signs a new striker",
    "general election campaign",
    "film wins award at the Oscars",
    "oil prices and the economy",
    "broadband and internet access",
    "tennis champion knocked out",
    "video games console launch",
    "tax cuts in the budget",
]

EDIT_SUFFIXES = [
    "Update: the company confirmed the figures on Monday.",
    "Correction: an earlier version misstated the date of the announcement.",
    "Analysts expect further news later this week.",
    "The story was updated with comments from officials.",
]

USERS = 200  # simulated users making the searches (each search's rollout key)


@dataclass
class Read:
    t: float  # seconds since the demo's clock started
    latency_ms: float
    ok: bool
    version: str  # the version that served it ("" if it failed)
    query: str
    error: str = ""
    user: str = ""  # the search's key (a simulated user)


@dataclass
class Write:
    t: float
    kind: str  # "edit" | "insert"
    pk: int
    ok: bool
    error: str = ""


@dataclass
class Sample:
    t: float
    version: str
    done: int
    total: int
    active: str


@dataclass
class Recorder:
    t0: float
    reads: list[Read] = field(default_factory=list)
    writes: list[Write] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    marks: list[tuple[float, str]] = field(default_factory=list)  # (t, label): steps, flip
    lock: threading.Lock = field(default_factory=threading.Lock)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def mark(self, label: str) -> None:
        with self.lock:
            self.marks.append((self.now(), label))


class Traffic:
    """Reader, writer and sampler threads; ``start()``, then ``stop()`` (joins them)."""

    def __init__(self, recorder: Recorder, *, read_interval: float = 0.25,
                 edit_interval: float = 2.0, insert_every: int = 4, k: int = 10,
                 seed: int = 0, sample_version: str | None = None) -> None:
        self.recorder = recorder
        self.read_interval = read_interval
        self.edit_interval = edit_interval
        self.insert_every = insert_every
        self.k = k
        self.rng = random.Random(seed)
        self.sample_version = sample_version
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.write_enabled = threading.Event()

    def start(self, *, writes: bool = True) -> None:
        if writes:
            self.write_enabled.set()
        for name, target in (("reader", self._reader), ("writer", self._writer),
                             ("sampler", self._sampler)):
            thread = threading.Thread(target=self._guard(target), name=f"demo-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        self._threads.clear()

    def _guard(self, body):
        def run() -> None:
            try:
                body()
            finally:
                connection.close()
        return run

    # --- reads ------------------------------------------------------------------------------
    def _reader(self) -> None:
        while not self._stop.is_set():
            query = self.rng.choice(SEARCH_QUERIES)
            user = f"user-{self.rng.randrange(USERS)}"
            started = time.monotonic()
            try:
                close_old_connections()
                results = Article.embedding.search(query, k=self.k, key=user)
                latency = (time.monotonic() - started) * 1000
                version = results[0].embedding_version if results else ""
                ok = len(results) == self.k and all(r.distance is not None for r in results)
                error = "" if ok else f"{len(results)} results instead of {self.k}"
                read = Read(self.recorder.now(), latency, ok, version, query, error, user)
            except Exception as exc:  # a failed read is counted, never hidden
                latency = (time.monotonic() - started) * 1000
                read = Read(self.recorder.now(), latency, False, "", query,
                            f"{type(exc).__name__}: {exc}"[:300], user)
            with self.recorder.lock:
                self.recorder.reads.append(read)
            self._stop.wait(self.read_interval)

    # --- writes -----------------------------------------------------------------------------
    def _writer(self) -> None:
        count = 0
        while not self._stop.is_set():
            if not self.write_enabled.is_set():
                self._stop.wait(0.2)
                continue
            count += 1
            kind = "insert" if count % self.insert_every == 0 else "edit"
            pk = 0
            try:
                close_old_connections()
                # One transaction per write, as a site with ATOMIC_REQUESTS does: the row and the
                # vectors the app's save signal writes for it commit together.
                with transaction.atomic():
                    pk = self._insert(count) if kind == "insert" else self._edit(count)
                write = Write(self.recorder.now(), kind, pk, True)
            except Exception as exc:
                write = Write(self.recorder.now(), kind, pk, False,
                              f"{type(exc).__name__}: {exc}"[:300])
            with self.recorder.lock:
                self.recorder.writes.append(write)
            self._stop.wait(self.edit_interval)

    def _edit(self, count: int) -> int:
        pks = list(Article.objects.order_by("pk").values_list("pk", flat=True)[:5000])
        article = Article.objects.get(pk=self.rng.choice(pks))
        suffix = EDIT_SUFFIXES[count % len(EDIT_SUFFIXES)]
        if count % 3 == 0:
            article.title = f"{article.title.split(' [')[0]} [edited {count}]"
        article.body = f"{article.body}\n\n{suffix} (edit {count})"
        article.save()  # the app's signal re-embeds it for every version still written
        return article.pk

    def _insert(self, count: int) -> int:
        source = Article.objects.order_by("?").first()
        article = Article.objects.create(
            title=f"Follow-up: {source.title}"[:300],
            body=f"{source.body.split(chr(10))[0]}\n\nA follow-up report (insert {count}).",
            category=source.category,
        )
        return article.pk

    # --- coverage samples -------------------------------------------------------------------
    def _sampler(self) -> None:
        while not self._stop.is_set():
            try:
                close_old_connections()
                versions = list(EmbeddingVersion.objects.for_target(TARGET))
                active = next((v.version for v in versions if v.state == State.ACTIVE), "")
                for version in versions:
                    if self.sample_version and version.version != self.sample_version:
                        continue
                    if version.state in (State.DROPPED, State.RETIRED):
                        continue
                    done, total = version.store.coverage()
                    with self.recorder.lock:
                        self.recorder.samples.append(
                            Sample(self.recorder.now(), version.version, done, total, active))
            except Exception:  # a version column may be added or dropped between two queries
                pass
            self._stop.wait(1.0)
