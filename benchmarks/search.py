"""Search latency: the app's ``search_vector`` against raw SQL on the same column, exact and
HNSW, at 100,000 rows of 384 dimensions; HNSW recall@10; the cost of query encoding.

Run: ``python -m benchmarks.search [--rows N] [--queries N]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks import harness

TARGET = "news.Article.embedding"


def main(argv: list[str] | None = None) -> list[harness.Row]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5,
                        help="passes over the queries in the HNSW measurement")
    parser.add_argument("--real", type=int, default=10_000, help="real sentences encoded")
    parser.add_argument("--ef-construction", type=int, default=128,
                        help="the index build's ef_construction (pgvector's default is 64)")
    parser.add_argument("--ef-search", type=int, default=100,
                        help="the version's hnsw_ef_search (pgvector's default is 40)")
    args = parser.parse_args(argv)

    harness.setup_django()
    from django.conf import settings
    from django.db import connection

    from embeddings_app import active, encoders, indexes, lifecycle, search
    from embeddings_app.config import get_config
    from embeddings_app.models import EmbeddingVersion, State
    from project.news.models import Article

    harness.reset_articles()
    sentences = harness.real_sentences(args.real + args.queries)
    table_sentences, query_sentences = sentences[: args.real], sentences[args.real:]
    minilm = encoders.load(get_config().model("minilm"))
    print(f"encoding {len(sentences)} real sentences with MiniLM ...", flush=True)
    base = minilm.encode_documents(table_sentences)
    queries = np.stack([minilm.encode_query(q) for q in query_sentences])

    lifecycle.add(TARGET, "v1", "minilm")
    vectors = harness.spread_vectors(base, args.rows, noise=0.35)
    texts = [f"{table_sentences[i % len(table_sentences)]} #{i}" for i in range(args.rows)]
    print(f"loading {args.rows} rows ...", flush=True)
    harness.load_precomputed("v1", texts, vectors)
    version = EmbeddingVersion.objects.get(target=TARGET, version="v1")
    lifecycle.transition(version, State.READY, note="benchmark data")
    lifecycle.activate(TARGET, "v1", force=True)  # reads are measured, not the cutover rules
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE news_article")

    def app_search(vector: np.ndarray) -> list[int]:
        return [a.pk for a in Article.embedding.search_vector(vector, version="v1", k=10)]

    def app_search_orm(vector: np.ndarray) -> list[int]:
        # With a queryset (here every row, no filter): the ORM-built query, every time.
        return [a.pk for a in Article.embedding.search_vector(
            vector, version="v1", k=10, queryset=Article.objects.all())]

    def raw_search(vector: np.ndarray) -> list[int]:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT id, title, body, category, embedding_v1 <=> %s::vector AS distance "
                "FROM news_article ORDER BY distance LIMIT 10",
                # The same text form of the vector as the app sends (its fastest; see
                # search.vector_literal), so the ratio is the app's overhead, not formatting.
                [search.vector_literal(vector)],
            )
            return [row[0] for row in cursor.fetchall()]

    rows: list[harness.Row] = []

    def measure(label: str, rounds: int) -> dict[int, list[int]]:
        samples, answers = harness.interleaved(
            {"app": app_search, "orm": app_search_orm, "raw": raw_search}, queries, rounds)
        results = {i: found[-1] for i, found in enumerate(answers["app"])}
        raw_s = harness.latency_summary(samples["raw"])
        for name, what in (("app", "search_vector"), ("orm", "search_vector(queryset=all())")):
            app_s = harness.latency_summary(samples[name])
            for stat in ("p50_ms", "p95_ms"):
                ratio = app_s[stat] / raw_s[stat]
                rows.append(harness.Row("search", f"{what} {label} {stat[:3]}", app_s[stat],
                                        "ms", "raw SQL ORDER BY <=> LIMIT 10", raw_s[stat],
                                        ratio, "<= 1.5x", ratio <= 1.5))
        return results

    exact = measure("exact", rounds=1)
    started = time.perf_counter()
    indexes.build(EmbeddingVersion.objects.get(target=TARGET, version="v1"),
                  ef_construction=args.ef_construction)
    build_seconds = time.perf_counter() - started
    EmbeddingVersion.objects.filter(target=TARGET, version="v1").update(
        hnsw_ef_search=args.ef_search)
    active.invalidate()  # the app's search and the raw SQL then share the session setting
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE news_article")
    hnsw = measure("HNSW", rounds=args.rounds)
    recall = float(np.mean([len(set(hnsw[i]) & set(exact[i])) / 10 for i in exact]))
    rows.append(harness.Row("search", f"HNSW recall@10 (ef_search {args.ef_search}, "
                            f"ef_construction {args.ef_construction})", recall, "",
                            "exact scan", 1.0, recall, ">= 0.95", recall >= 0.95,
                            {"index_build_s": build_seconds}))

    # Query encoding: what search() adds before the SQL.
    minilm.clear_query_cache()
    distinct = iter(query_sentences)
    fresh = harness.time_calls(lambda: minilm.encode_query(next(distinct)),
                               repeat=len(query_sentences), warmup=0)
    repeated = harness.time_calls(lambda: minilm.encode_query(query_sentences[0]), repeat=200)
    fresh_p50 = harness.percentile(fresh, 50) * 1000
    repeated_p50 = harness.percentile(repeated, 50) * 1000
    rows.append(harness.Row("search", "MiniLM query encode p50 (distinct queries)", fresh_p50, "ms",
                            "HNSW search_vector p50",
                            next(r.value for r in rows if r.measure == "search_vector HNSW p50"),
                            None))
    rows.append(harness.Row("search", "query encode p50, repeated query (cache)", repeated_p50,
                            "ms", "distinct queries", fresh_p50, repeated_p50 / fresh_p50))
    minilm.clear_query_cache()
    settings.EMBEDDINGS = {**settings.EMBEDDINGS, "QUERY_CACHE_SIZE": 0}
    uncached = harness.time_calls(lambda: minilm.encode_query(query_sentences[0]), repeat=50)
    uncached_p50 = harness.percentile(uncached, 50) * 1000
    rows.append(harness.Row("search", "query encode p50, repeated query, cache off",
                            uncached_p50, "ms", "cache on", repeated_p50,
                            uncached_p50 / repeated_p50))
    harness.print_table(rows)
    print("results:", harness.write_json("search", rows, {"rows": args.rows}))
    return rows


if __name__ == "__main__":
    main()
