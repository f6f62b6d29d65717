"""Binary quantization + re-rank against full-precision HNSW at 100,000 rows of **real** vectors.

``benchmarks/derive_scale.py`` measured the bit version on synthetic vectors (mixtures of 600
real mpnet vectors), where even full-precision HNSW reached only 0.652 recall@10. Here every
vector is the real model's output for its row's text:

* rows: ``--rows`` distinct passages of the BBC News corpus's article bodies (``passages``): the
  bodies' sentences (at least 6 words, 34,857), then windows of 20 words every 10 words over
  each body (fixed-size overlapping chunks, as a retrieval pipeline cuts documents), in the
  corpus order, until there are ``--rows``; each row's text is its passage (``body``; ``title``
  empty), so the stored vector is the model's output for the row's text and ``derive``'s sample
  check runs for real;
* model: all-MiniLM-L6-v2 (alias ``minilm``, 384 dimensions; mpnet would take hours here), the
  documents encoded once and cached as ``.npy`` chunks under the data folder
  (``<EMBEDDINGS_DATA_DIR>/benchmarks/bit_real-<fingerprint>/``, each named by the hash of its
  texts), so a re-run skips the encoding; each chunk's encode time is kept beside it;
* queries: ``--queries`` article titles (held out: titles are not among the rows' texts), one
  every ``len(articles) / queries`` articles, encoded with ``encode_query``.

Then v1 = the real vectors (bulk-loaded with their source hashes, backfill finds nothing to do),
v3 = ``derive --storage bit`` from v1 (timed, sample check included), HNSW on both with the
app's defaults (m 16, ef_construction 64, ``maintenance_work_mem`` 1GB), and searches through
``search_vector`` (the app's search path) with each version active in turn: recall@10 against
exact search (numpy, all rows) on v1's vectors, p50 latency, index sizes. v1 at
``--ef-search`` values (the first is the app's default, 40), the bit version at
``--oversampling`` factors (``EMBEDDINGS["RERANK_OVERSAMPLING"]``); a diagnostic re-ranks
exhaustive Hamming candidates (numpy, no index) to tell the quantization's loss from the
Hamming index's.

Run: ``python -m benchmarks.bit_real [--rows N] [--queries Q] [--oversampling F ...]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np

from benchmarks import harness

TARGET = "news.Article.embedding"
CHUNK = 5000  # texts per cached .npy chunk


def passages(count: int, min_words: int = 6, window: int = 20,
             stride: int = 10) -> tuple[list[str], list[str], dict[str, int]]:
    """(``count`` distinct passages of the article bodies, every article's title, how many
    passages of each kind): the bodies' sentences of at least ``min_words`` words, in the
    corpus order, then windows of ``window`` words every ``stride`` words over each body (the
    fixed-size overlapping chunks of a retrieval pipeline), until there are ``count``. A
    passage equal to an earlier one or to a title is skipped (titles are the queries)."""
    from project.news.corpus import iter_articles

    articles = list(iter_articles())
    titles = [a.title for a in articles]
    seen: set[str] = set(titles)
    texts: list[str] = []
    kinds = {"sentences": 0, f"windows of {window} words": 0}

    def take(text: str, kind: str) -> bool:
        if text not in seen:
            seen.add(text)
            texts.append(text)
            kinds[kind] += 1
        return len(texts) >= count

    for article in articles:
        for sentence in re.split(r"(?<=[.!?])\s+", article.body):
            if len(sentence.split()) >= min_words and take(sentence.strip(), "sentences"):
                return texts, titles, kinds
    for article in articles:
        words = article.body.split()
        for start in range(0, max(1, len(words) - window + 1), stride):
            if take(" ".join(words[start:start + window]), f"windows of {window} words"):
                return texts, titles, kinds
    return texts, titles, kinds


def cached_encode(encoder: object, texts: list[str]) -> tuple[np.ndarray, dict[str, float]]:
    """The documents' vectors, from the cache when present: chunks of ``CHUNK`` texts, each a
    ``.npy`` file named by the hash of its texts, with the time its encoding took (and the load
    average then) beside it. Returns the vectors and the encode figures of the runs that
    computed them (texts, seconds, texts/s, load averages)."""
    from project.settings import DATA_DIR

    folder = Path(DATA_DIR) / "benchmarks" / (
        f"bit_real-{encoder.fingerprint[:12]}")  # type: ignore[attr-defined]
    folder.mkdir(parents=True, exist_ok=True)
    parts, records = [], []
    for start in range(0, len(texts), CHUNK):
        chunk = texts[start:start + CHUNK]
        name = hashlib.sha256("\n".join(chunk).encode()).hexdigest()[:16]
        path, meta_path = folder / f"{name}.npy", folder / f"{name}.json"
        if not path.exists():
            load_before = harness.load_average()
            started = time.perf_counter()
            vectors = encoder.encode_documents(chunk)  # type: ignore[attr-defined]
            seconds = time.perf_counter() - started
            np.save(path, np.asarray(vectors, dtype=np.float32))
            meta_path.write_text(json.dumps({"texts": len(chunk), "seconds": seconds,
                                             "load_before": load_before,
                                             "load_after": harness.load_average()}))
            print(f"  encoded {start + len(chunk):,}/{len(texts):,} ({len(chunk) / seconds:.1f} "
                  f"texts/s, load {harness.load_average()})", flush=True)
        parts.append(np.load(path))
        records.append(json.loads(meta_path.read_text()))
    seconds = sum(r["seconds"] for r in records)
    return np.vstack(parts), {
        "texts": sum(r["texts"] for r in records), "seconds": seconds,
        "per_second": sum(r["texts"] for r in records) / seconds if seconds else float("nan"),
        "loads": [r["load_after"] for r in records], "folder": str(folder)}


def load_rows(version_name: str, texts: list[str], vectors: np.ndarray, chunk: int = 5000) -> None:
    """One article per text (``body``; ``title`` empty, so its source text is the text itself)
    and its vector as ``version_name``'s, with the source hash: fresh rows, through the app's
    bulk write path."""
    from django.db import transaction

    from embeddings_app import registry
    from embeddings_app.models import EmbeddingVersion
    from project.news.models import Article

    field = registry.get(TARGET)
    version = EmbeddingVersion.objects.get(target=TARGET, version=version_name)
    for start in range(0, len(texts), chunk):
        part = texts[start:start + chunk]
        articles = Article.objects.bulk_create([Article(title="", body=t) for t in part])
        rows = [(a.pk, field.source_hash(field.source_text(a)), vectors[start + i])
                for i, a in enumerate(articles)]
        with transaction.atomic():
            version.store.write(rows)


def main(argv: list[str] | None = None) -> list[harness.Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[40, 100, 200])
    parser.add_argument("--oversampling", type=int, nargs="+", default=[10, 20, 40, 80])
    parser.add_argument("--repeat", type=int, default=1,
                        help="timed searches per query (after one untimed)")
    parser.add_argument("--keep", action="store_true",
                        help="leave the rows, versions and indexes in the benchmark database")
    args = parser.parse_args(argv)
    harness.setup_django()
    from django.conf import settings
    from django.db import connection

    from embeddings_app import active, backfill, derive, encoders, lifecycle, stores
    from embeddings_app.config import get_config
    from embeddings_app.models import EmbeddingVersion
    from project.news.models import Article

    print(f"load before: {harness.load_average()}", flush=True)
    texts, titles, widths = passages(args.rows)
    step = max(1, len(titles) // args.queries)
    queries = titles[::step][:args.queries]
    print(f"{len(texts):,} passages (mean {np.mean([len(t.split()) for t in texts]):.1f} words); "
          f"{widths}; {len(queries)} title queries", flush=True)
    model = encoders.load(get_config().model("minilm"))
    vectors, encoded = cached_encode(model, texts)
    print(f"documents: {vectors.shape} from {encoded['folder']} (encoded at "
          f"{encoded['per_second']:.1f} texts/s)", flush=True)
    query_vectors = np.vstack([model.encode_query(q) for q in queries]).astype(np.float32)

    harness.reset_articles()
    lifecycle.add(TARGET, "v1", "minilm")
    with harness.stopwatch() as load:
        load_rows("v1", texts, vectors)
    run, ranges = backfill.start(EmbeddingVersion.objects.get_version(TARGET, "v1"),
                                 batch_size=5000, mode="inline")
    backfill.run_inline(run, ranges)  # nothing to embed: v1 becomes ready
    print(f"v1: {len(texts):,} real vectors loaded in {load['seconds']:.1f}s", flush=True)
    with harness.stopwatch() as derived:
        v3, report = derive.derive(TARGET, "v3", "v1", storage="bit", batch_size=5000)
        run, ranges = backfill.start(v3, batch_size=5000, mode="inline")
        backfill.run_inline(run, ranges)
    print(f"v3 derived (bit, {report.check.summary()}): {derived['seconds']:.1f}s", flush=True)

    keys = list(Article.objects.order_by("pk").values_list("pk", flat=True))
    assert len(keys) == len(texts)  # inserted in the texts' order: row i is texts[i]
    full = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    exact = [set(np.argsort(-(full @ q))[:10]) for q in query_vectors]
    exhaustive = {factor: harness.exhaustive_hamming_recall(full, query_vectors, exact, factor)
                  for factor in args.oversampling}
    print("bit + re-rank over exhaustive Hamming candidates (numpy, no index): " + ", ".join(
        f"{factor} x k {recall:.3f}" for factor, recall in exhaustive.items()), flush=True)

    def build(name: str) -> tuple[float, int]:
        with harness.stopwatch() as timed:
            lifecycle.build_index(TARGET, name, maintenance_work_mem="1GB")
        version = EmbeddingVersion.objects.get_version(TARGET, name)
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_relation_size(%s::regclass)",
                           [stores.qn(version.store.index_name())])
            return timed["seconds"], int(cursor.fetchone()[0])

    full_build, full_size = build("v1")
    bit_build, bit_size = build("v3")
    print(f"HNSW v1 {full_build:.0f}s {full_size / 2**20:.1f}MB; v3 bit {bit_build:.0f}s "
          f"{bit_size / 2**20:.1f}MB; load {harness.load_average()}", flush=True)
    position = {pk: i for i, pk in enumerate(keys)}

    def measure(name: str) -> tuple[float, float]:
        samples, recalls = [], []
        for i, q in enumerate(query_vectors):
            hits = Article.embedding.search_vector(q, version=name, k=10)
            for _ in range(args.repeat):
                started = time.perf_counter()
                hits = Article.embedding.search_vector(q, version=name, k=10)
                samples.append(time.perf_counter() - started)
            recalls.append(len(exact[i] & {position[h.pk] for h in hits}) / 10)
        return float(np.mean(recalls)), harness.percentile(samples, 50) * 1000

    def set_ef_search(name: str, ef_search: int) -> None:
        EmbeddingVersion.objects.filter(target=TARGET, version=name).update(
            hnsw_ef_search=ef_search)
        active.invalidate(TARGET)

    lifecycle.activate(TARGET, "v1", force=True)
    full_sweep = {}
    for ef_search in args.ef_search:
        set_ef_search("v1", ef_search)
        full_sweep[ef_search] = measure("v1")
        print(f"full-precision HNSW, ef_search {ef_search}: recall@10 "
              f"{full_sweep[ef_search][0]:.3f}, p50 {full_sweep[ef_search][1]:.2f} ms",
              flush=True)
    set_ef_search("v1", args.ef_search[0])
    lifecycle.activate(TARGET, "v3", force=True)
    configured = settings.EMBEDDINGS
    bit_sweep = {}
    for factor in args.oversampling:
        settings.EMBEDDINGS = {**configured, "RERANK_OVERSAMPLING": factor}
        bit_sweep[factor] = measure("v3")
        print(f"bit + re-rank, {factor} x k candidates: recall@10 {bit_sweep[factor][0]:.3f}, "
              f"p50 {bit_sweep[factor][1]:.2f} ms", flush=True)
    settings.EMBEDDINGS = configured
    load_after = harness.load_average()
    default = get_config().rerank_oversampling
    default_ef = args.ef_search[0]
    full_recall, full_p50 = full_sweep[default_ef]
    bit_recall, bit_p50 = bit_sweep.get(default) or next(iter(bit_sweep.values()))
    rows = [
        harness.Row("bit_real", f"recall@10 bit + re-rank ({default} x k, the default) vs "
                    f"exact, {len(texts):,} real MiniLM vectors", bit_recall, "",
                    baseline=f"full-precision HNSW recall@10 (ef_search {default_ef})",
                    baseline_value=full_recall, target=">= 0.95", met=bit_recall >= 0.95,
                    extra={"recall_exhaustive_hamming": exhaustive.get(default)}),
        harness.Row("bit_real", f"p50 latency bit + re-rank ({default} x k), search_vector",
                    bit_p50, "ms", baseline=f"full-precision HNSW p50 (ef_search {default_ef})",
                    baseline_value=full_p50, ratio=bit_p50 / full_p50),
        *[harness.Row("bit_real", f"full-precision HNSW ef_search {ef}: recall@10 / p50 ms",
                      recall, "", baseline="p50 ms", baseline_value=p50)
          for ef, (recall, p50) in full_sweep.items()],
        *[harness.Row("bit_real", f"bit + re-rank at {factor} x k: recall@10 / p50 ms",
                      recall, "", baseline="p50 ms", baseline_value=p50,
                      extra={"recall_exhaustive_hamming": exhaustive[factor]})
          for factor, (recall, p50) in bit_sweep.items()],
        harness.Row("bit_real", "HNSW index size bit (bit_hamming_ops)", bit_size / 2**20, "MB",
                    baseline="full-precision HNSW (vector_cosine_ops)",
                    baseline_value=full_size / 2**20, ratio=full_size / bit_size),
        harness.Row("bit_real", "HNSW build time bit", bit_build, "s",
                    baseline="full-precision HNSW build", baseline_value=full_build,
                    ratio=full_build / bit_build),
        harness.Row("bit_real", "derive --storage bit (+ backfill, real sample check)",
                    derived["seconds"], "s"),
    ]
    harness.print_table(rows)
    print(f"load after: {load_after}")
    print("results:", harness.write_json("bit_real", rows, {
        "rows": len(texts), "queries": len(queries), "texts": "BBC body sentences, then "
        "20-word windows every 10 words of the bodies", "passages": widths,
        "queries_from": "article titles", "model": "minilm (all-MiniLM-L6-v2, 384)",
        "encode": {k: v for k, v in encoded.items() if k != "folder"},
        "load_after": load_after}))
    if not args.keep:
        harness.reset_articles()
    return rows


if __name__ == "__main__":
    main()
