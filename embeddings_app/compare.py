"""``compare``: shadow reads of the same queries against two versions.

For every query each version embeds it with its own model and searches its own column (exactly as
``search()`` would if it were active). Reported per version: recall@k and nDCG@k where relevance
is known; and overlap@k between the two result lists.

Queries come from a TSV file (``query<TAB>row key``, one relevant row per line; repeat the query
for several relevant rows; a line with no tab is a query with unknown relevance, used for overlap
only), or, with no file, are *proxy queries* drawn from the corpus: one sentence taken out of a
sampled document, with that document as the relevant one. No labels are needed to see which model
finds the document a sentence came from more often.

Beside the scores, each version's truncation (``truncation``): how many of the same sampled rows
exceed its model's token limit, and by how much; with a note when the version with the lower
recall also cuts clearly more rows, since proxy queries come from anywhere in a document.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import encoders, limits, registry, search, truncation
from .config import get_config
from .exceptions import Refused
from .models import EmbeddingVersion, State

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
MIN_WORDS, MAX_WORDS = 6, 40


@dataclass
class Query:
    text: str
    relevant: set[str] = field(default_factory=set)  # row keys (str(pk)); empty: unknown


@dataclass
class VersionScores:
    version: str
    recall: float | None = None
    ndcg: float | None = None


@dataclass
class CompareReport:
    target: str
    k: int
    source: str  # "proxy" or the file name
    queries: int
    judged: int  # queries with known relevance
    a: VersionScores
    b: VersionScores
    overlap: float
    # Rows longer than each model's token limit, counted on the same sampled rows for both.
    truncation_a: truncation.Truncation | None = None
    truncation_b: truncation.Truncation | None = None

    def lines(self) -> list[str]:
        def fmt(value: float | None) -> str:
            return "-" if value is None else f"{value:.3f}"

        k = self.k
        rows = [("metric", self.a.version, self.b.version)]
        if self.judged:
            rows.append((f"recall@{k}", fmt(self.a.recall), fmt(self.b.recall)))
            rows.append((f"nDCG@{k}", fmt(self.a.ndcg), fmt(self.b.ndcg)))
        rows.append((f"overlap@{k}", fmt(self.overlap), ""))
        figures = [(self.a.version, self.truncation_a), (self.b.version, self.truncation_b)]
        if any(figure is not None for _, figure in figures):
            rows.append(("truncated", *(figure.cell() if figure else "-" for _, figure in figures)))
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        head = (f"compare {self.target} {self.a.version} vs {self.b.version}: {self.queries} "
                f"queries ({self.source}), {self.judged} with known relevance, k={k}")
        lines = [head] + ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                          for row in rows]
        lines += [f"truncation {name}: {figure.summary()}" for name, figure in figures if figure]
        note = truncation.explain(self.a.version, self.truncation_a, self.b.version,
                                  self.truncation_b, self.a.recall, self.b.recall, k)
        return lines + ([note] if note else [])


def read_queries(path: str | Path) -> list[Query]:
    """Parse a relevance file: ``query<TAB>row key`` per line (``#`` comments, blanks ignored)."""
    by_text: dict[str, Query] = {}
    try:
        content = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise Refused(f"Cannot read the queries file {path}: {exc.strerror}.") from None
    for line in content.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        text, _, key = line.partition("\t")
        query = by_text.setdefault(text.strip(), Query(text.strip()))
        if key.strip():
            query.relevant.add(key.strip())
    if not by_text:
        raise Refused(f"The queries file {path} has no queries.")
    return list(by_text.values())


def proxy_queries(target: str, count: int = 100, seed: int = 0) -> list[Query]:
    """One sentence out of each of ``count`` sampled rows; that row is the relevant one."""
    field_ = registry.get(target)
    pks = list(field_.model._base_manager.order_by("pk").values_list("pk", flat=True))
    rng = random.Random(seed)
    rng.shuffle(pks)
    queries: list[Query] = []
    for start in range(0, len(pks), 500):
        if len(queries) >= count:
            break
        chunk = pks[start:start + 500]
        rows = {obj.pk: obj for obj in field_.source_queryset().filter(pk__in=chunk)}
        for pk in chunk:
            obj = rows.get(pk)
            if obj is None:
                continue
            sentences = [s.strip() for s in SENTENCE_END.split(field_.source_text(obj))
                         if MIN_WORDS <= len(s.split()) <= MAX_WORDS]
            if not sentences:
                continue
            queries.append(Query(rng.choice(sentences), {str(pk)}))
            if len(queries) >= count:
                break
    return queries


def _scores(found: list[str], relevant: set[str], k: int) -> tuple[float, float]:
    hits = [1.0 if key in relevant else 0.0 for key in found[:k]]
    recall = sum(hits) / len(relevant)
    dcg = sum(hit / math.log2(rank + 2) for rank, hit in enumerate(hits))
    ideal = sum(1 / math.log2(rank + 2) for rank in range(min(len(relevant), k)))
    return recall, dcg / ideal


def compare(target: str, version_a: str, version_b: str, *, queries: list[Query] | None = None,
            k: int = 10, sample: int = 100, seed: int = 0, source: str = "") -> CompareReport:
    limits.integer("k", k, 1, limits.MAX_K, "k")
    limits.integer("The comparison sample", sample, 1, limits.MAX_COMPARE_SAMPLE, "sample")
    field_ = registry.get(target)
    versions = [EmbeddingVersion.objects.get_version(target, name)
                for name in (version_a, version_b)]
    for version in versions:
        if version.state in (State.DROPPED, State.RETIRED, State.NEW):
            raise Refused(f"{version} is {version.state}: its vectors are not complete and "
                          "current; compare versions that are backfilled and kept fresh.")
    if queries is None:
        queries = proxy_queries(target, sample, seed)
        source = "proxy: a sentence out of a document, that document relevant"
    if not queries:
        raise Refused(f"{target} has no rows to draw proxy queries from.")
    encoders_ = [encoders.for_version(version) for version in versions]
    totals = [[0.0, 0.0], [0.0, 0.0]]
    overlap_total = 0.0
    judged = 0
    for query in queries:
        results: list[list[str]] = []
        for version, encoder in zip(versions, encoders_, strict=True):
            vector = encoder.encode_query(query.text)
            found = search._nearest(field_, version, vector, k, None)
            results.append([str(obj.pk) for obj in found])
        overlap_total += len(set(results[0]) & set(results[1])) / k
        if query.relevant:
            judged += 1
            for index, found_keys in enumerate(results):
                recall, ndcg = _scores(found_keys, query.relevant, k)
                totals[index][0] += recall
                totals[index][1] += ndcg
    scores = [
        VersionScores(version.version, *(
            (total[0] / judged, total[1] / judged) if judged else (None, None)))
        for version, total in zip(versions, totals, strict=True)
    ]
    # Truncation, on the same sampled rows for both models, recorded on each version.
    keys, rows = truncation.sample_keys(field_)
    figures = []
    for version, encoder in zip(versions, encoders_, strict=True):
        spec = get_config().model(version.model_alias)
        figure = truncation.measure(target, spec, encoder, by="compare", keys=keys, rows=rows,
                                    chunked=version.chunk_tokens)
        truncation.record(version, figure)
        figures.append(figure)
    return CompareReport(target=target, k=k, source=source or "file", queries=len(queries),
                         judged=judged, a=scores[0], b=scores[1],
                         overlap=overlap_total / len(queries), truncation_a=figures[0],
                         truncation_b=figures[1])


