"""Shared set-up of the benchmarks: a database of their own, data, timing and the report.

Every benchmark prints its figure next to a baseline measured in the same run, as a ratio.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"


def setup_django() -> None:
    """Django on the benchmarks' own database (``embeddings_bench``), migrated."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")  # + the tiny test models
    os.environ.setdefault("EMBEDDINGS_DB_NAME", "embeddings_bench")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    from tests.tinymodel import build_tiny_model

    call_command("migrate", verbosity=0)
    # The small local models of tests/settings.py, built once (deterministic).
    tokenizer = Path(settings.EMBEDDINGS["MODELS"]["minilm"]["model"])
    build_tiny_model(settings.TEST_MODELS_DIR / "tiny-bert", tokenizer, seed=0)
    build_tiny_model(settings.TEST_MODELS_DIR / "tiny-bert-seed1", tokenizer, seed=1)


def reset_target(target: str) -> None:
    """An empty table for ``target`` without any version column, and no version records."""
    from django.db import connection

    from embeddings_app import registry, stores
    from embeddings_app.models import EmbeddingVersion

    field = registry.get(target)
    stores.drop_leftovers(field)
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {stores.qn(field.table)} RESTART IDENTITY")
    EmbeddingVersion.objects.filter(target=target).delete()


def reset_articles() -> None:
    """An empty article table without any version column, and no version records."""
    reset_target("news.Article.embedding")


def percentile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def interleaved(sides: Mapping[str, Callable[[Any], Any]], queries: Sequence[Any], rounds: int
                ) -> tuple[dict[str, list[float]], dict[str, list[list[Any]]]]:
    """Every query on every side, ``rounds`` times, interleaved in a rotating order: each side
    is as often first (after another query's work) as last, and all see the same cache state.
    Returns the seconds of each call per side, and each side's answers per query (one per
    round)."""
    names = list(sides)
    samples: dict[str, list[float]] = {name: [] for name in names}
    answers: dict[str, list[list[Any]]] = {name: [[] for _ in queries] for name in names}
    for round_ in range(rounds):
        for i, query in enumerate(queries):
            shift = (i + round_) % len(names)
            for name in names[shift:] + names[:shift]:
                started = time.perf_counter()
                found = sides[name](query)
                samples[name].append(time.perf_counter() - started)
                answers[name][i].append(found)
    return samples, answers


def latency_summary(samples_s: Sequence[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples_s]
    return {"p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95),
            "p99_ms": percentile(ms, 99), "mean_ms": statistics.fmean(ms) if ms else float("nan"),
            "n": len(ms)}


def time_calls(call: Callable[[], Any], repeat: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


@contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    box: dict[str, float] = {}
    started = time.perf_counter()
    try:
        yield box
    finally:
        box["seconds"] = time.perf_counter() - started


@dataclass
class Row:
    """One line of the report: a measured figure against its same-run baseline."""

    benchmark: str
    measure: str
    value: float
    unit: str
    baseline: str = ""
    baseline_value: float | None = None
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as ``uptime`` prints them (the machine is shared:
    a benchmark prints them with its figures)."""
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def machine() -> dict[str, Any]:
    import torch

    return {"python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform()}


def print_table(rows: Sequence[Row]) -> None:
    header = ("benchmark", "measure", "value", "baseline", "ratio", "target")
    lines = [header]
    for row in rows:
        base = (f"{row.baseline} = {_fmt(row.baseline_value)} {row.unit}"
                if row.baseline_value is not None else row.baseline)
        verdict = "" if row.met is None else (" ok" if row.met else " MISSED")
        lines.append((row.benchmark, row.measure, f"{_fmt(row.value)} {row.unit}", base,
                      "" if row.ratio is None else f"{row.ratio:.2f}x",
                      (row.target + verdict).strip()))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)))


def write_json(name: str, rows: Sequence[Row], extra: dict[str, Any] | None = None) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    # The run's settings under their own key: a setting named "rows" (a table size) once
    # replaced the results.
    path.write_text(json.dumps({"machine": machine(), "settings": extra or {},
                                "rows": [asdict(r) for r in rows]}, indent=2, default=str))
    return path


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def real_sentences(limit: int, min_words: int = 6) -> list[str]:
    """Distinct sentences of the BBC News corpus, in a stable order."""
    import re

    from project.news.corpus import iter_articles

    seen: set[str] = set()
    sentences = []
    for article in iter_articles():
        for sentence in re.split(r"(?<=[.!?])\s+", f"{article.title}. {article.body}"):
            sentence = sentence.strip()
            if len(sentence.split()) >= min_words and sentence not in seen:
                seen.add(sentence)
                sentences.append(sentence)
                if len(sentences) >= limit:
                    return sentences
    return sentences


def spread_vectors(base: Any, count: int, noise: float, seed: int = 0) -> Any:
    """``count`` unit vectors around real ones: base[i % len(base)] plus Gaussian noise.

    Keeps the cluster structure of real embeddings (what HNSW recall depends on) at a row count
    that encoding real text would take too long to reach on this machine."""
    import numpy as np

    rng = np.random.default_rng(seed)
    picks = base[np.arange(count) % len(base)]
    vectors = picks + rng.normal(0, noise / np.sqrt(base.shape[1]), size=picks.shape)
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def exhaustive_hamming_recall(full: Any, query_vectors: Any, exact: Sequence[set[int]],
                              factor: int, k: int = 10) -> float:
    """Recall@k of a binary-quantization re-rank over *exhaustive* Hamming candidates (numpy,
    no index): the ``factor`` x k rows whose sign bits agree most with each query's, re-ranked by
    ``full`` (unit rows) against the query; ``exact``: each query's exact top k (row indexes).
    Tells the quantization's loss from a Hamming index's."""
    import numpy as np

    signs = np.where(full > 0, 1, -1).astype(np.float32)
    found = []
    for i, q in enumerate(query_vectors):
        agreement = signs @ np.where(q > 0, 1, -1).astype(np.float32)  # N - 2 x Hamming
        candidates = np.argpartition(-agreement, factor * k)[:factor * k]
        best = candidates[np.argsort(-(full[candidates] @ q))[:k]]
        found.append(len(exact[i] & set(best)) / k)
    return float(np.mean(found))


def load_precomputed(version_name: str, texts: Sequence[str], vectors: Any,
                     chunk: int = 5000) -> None:
    """Insert one article per text and store ``vectors`` as its ``version_name`` vectors, with
    the right source hashes (the rows count as fresh), through the app's bulk write path."""
    from django.db import transaction

    from embeddings_app import registry
    from embeddings_app.models import EmbeddingVersion
    from project.news.models import Article

    field = registry.get("news.Article.embedding")
    version = EmbeddingVersion.objects.get(target=field.target, version=version_name)
    for start in range(0, len(texts), chunk):
        part = texts[start:start + chunk]
        articles = Article.objects.bulk_create([Article(title=t[:300], body="") for t in part])
        rows = [(a.pk, field.source_hash(field.source_text(a)), vectors[start + i])
                for i, a in enumerate(articles)]
        with transaction.atomic():
            version.store.write(rows)


def use_near_free_encoder(dimensions: int | None = None, distinct: int = 1024) -> None:
    """Replace model inference by a table lookup, so a benchmark measures everything but the
    encoder (reads, hashing, locking, the bulk write). The vectors are fixed unit vectors chosen
    by the text's hash among ``distinct`` ones, of the loaded model's real dimension unless
    ``dimensions`` is given."""
    import zlib

    import numpy as np

    from embeddings_app import encoders

    tables: dict[int, Any] = {}

    def lookup(self: encoders.Encoder, texts: list[str], prompt: str | None) -> Any:
        # Without ``dimensions``, the loading encoder's probe (before ``self._dimensions`` is set)
        # gets 32: pass the model's real width when the column type matters.
        dims = dimensions or getattr(self, "_dimensions", None) or 32
        if dims not in tables:
            rng = np.random.default_rng(dims)
            table = rng.normal(size=(distinct, dims)).astype(np.float32)
            tables[dims] = table / np.linalg.norm(table, axis=1, keepdims=True)
        self.calls += 1
        return tables[dims][[zlib.crc32(t.encode("utf-8", "surrogatepass")) % distinct
                             for t in texts]]

    encoders.SentenceTransformersEncoder._encode = lookup  # type: ignore[method-assign]
    encoders.clear_cache()


def insert_corpus_articles(count: int) -> None:
    """``count`` real BBC News articles in the corpus order; past the corpus's 2,225 it starts
    over, with a numbered title."""
    from project.news.corpus import iter_articles
    from project.news.models import Article

    corpus = list(iter_articles())
    Article.objects.bulk_create([
        Article(title=item.title if i < len(corpus) else f"{item.title} ({i // len(corpus)})",
                body=item.body, category=item.category)
        for i, item in ((i, corpus[i % len(corpus)]) for i in range(count))
    ], batch_size=2000)


def insert_articles(count: int, chunk: int = 10_000, words: int = 40) -> None:
    """``count`` articles of distinct synthetic text (title + ~``words`` words), fast."""
    from project.news.models import Article

    vocabulary = [
        "market", "growth", "vote", "court", "film", "match", "phone", "bank", "music", "league",
        "price", "minister", "album", "player", "network", "shares", "budget", "award", "season",
        "software",
    ]
    for start in range(0, count, chunk):
        batch = []
        for i in range(start, min(count, start + chunk)):
            body = " ".join(vocabulary[(i * 7 + j * 3) % len(vocabulary)] for j in range(words))
            batch.append(Article(title=f"Article {i}", body=f"{body} {i}"))
        Article.objects.bulk_create(batch)


def relation_sizes(table: str = "news_article") -> dict[str, int]:
    """Bytes of the table (heap + TOAST) and of its indexes."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_table_size(%s), pg_indexes_size(%s)", [table, table])
        heap, index = cursor.fetchone()
    return {"table_bytes": int(heap), "index_bytes": int(index)}
