"""Chunked versions (embeddings_app.chunking): the chunked backfill's throughput against raw
``encode`` of the same chunks, and search over chunks against raw SQL doing the same best-chunk
ranking, exact and through HNSW. Real MiniLM, real BBC articles.

The backfill side is an inline backfill of a new chunked version (cutting, hashing, the stored
hashes' read, encoding, the compare-and-set write); the baseline is MiniLM's ``encode`` of
exactly the chunks it wrote, in one call. Search: ``search_vector`` on the chunked version (the
k = 10 best distinct rows with their chunk) against one raw statement: the 4 x k nearest chunks,
``DISTINCT ON`` the row, joined to the rows, ordered by distance (the app's first round; it read
more only if fewer than k rows came back, counted in the report). Interleaved, rotating order.

Run: ``python -m benchmarks.chunks [--docs N] [--chunks TOKENS] [--queries N]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks import harness

TARGET = "news.Article.embedding"


def main(argv: list[str] | None = None) -> list[harness.Row]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--docs", type=int, default=300)
    parser.add_argument("--chunks", type=int, default=128, help="tokens per chunk")
    parser.add_argument("--overlap", type=int, default=0)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args(argv)

    harness.setup_django()
    from django.db import connection

    from embeddings_app import backfill, chunking, encoders, indexes, lifecycle, search
    from embeddings_app.models import EmbeddingVersion, State
    from project.news.models import Article

    harness.reset_articles()
    harness.insert_corpus_articles(args.docs)
    rows: list[harness.Row] = []

    version = lifecycle.add(TARGET, "v1", "minilm", chunks=args.chunks, overlap=args.overlap)
    run, ranges = backfill.start(version, batch_size=128, mode="inline")
    started = time.perf_counter()
    backfill.run_inline(run, ranges)
    app_seconds = time.perf_counter() - started
    version.refresh_from_db()
    assert version.state == State.READY, version.state
    field = Article.embedding
    encoder = encoders.for_version(version)
    texts = [chunk.text for article in Article.objects.order_by("pk")
             for chunk in chunking.cut(version, encoder, field.source_text(article))]
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {version.table}")
        stored = cursor.fetchone()[0]
    assert stored == len(texts), (stored, len(texts))
    started = time.perf_counter()
    encoder.encode_documents(texts)
    raw_seconds = time.perf_counter() - started
    app_rate, raw_rate = len(texts) / app_seconds, len(texts) / raw_seconds
    rows.append(harness.Row(
        "chunks", f"chunked backfill, {args.docs} articles, {len(texts)} chunks of <= "
        f"{args.chunks} tokens", app_rate, "chunks/s", "raw encode of the same chunks", raw_rate,
        app_rate / raw_rate, ">= 0.9x", app_rate / raw_rate >= 0.9))

    sentences = harness.real_sentences(args.queries)
    queries = [encoder.encode_query(text) for text in sentences]
    lifecycle.transition(version, State.READY, note="benchmark data")
    lifecycle.activate(TARGET, "v1", force=True)  # reads are measured, not the cutover rules
    with connection.cursor() as cursor:
        cursor.execute(f"VACUUM ANALYZE {version.table}")
    k = args.k
    raw_sql = (
        "SELECT t.id, t.title, t.body, t.category, b.chunk_no, b.start_char, b.end_char, "
        "b.distance FROM (SELECT DISTINCT ON (id) id, chunk_no, start_char, end_char, distance "
        f"FROM (SELECT id, chunk_no, start_char, end_char, vector <=> %s::vector AS distance "
        f"FROM {version.table} ORDER BY vector <=> %s::vector LIMIT %s) c "
        "ORDER BY id, distance) b JOIN news_article t ON t.id = b.id "
        "ORDER BY b.distance, t.id LIMIT %s")
    rounds_needed = []

    def app(vector: np.ndarray) -> list[int]:
        return [a.pk for a in field.search_vector(vector, version="v1", k=k)]

    def raw(vector: np.ndarray) -> list[int]:
        literal = search.vector_literal(vector)
        with connection.cursor() as cursor:
            cursor.execute(raw_sql, [literal, literal, chunking.CANDIDATES_PER_ROW * k, k])
            return [row[0] for row in cursor.fetchall()]

    def measure(label: str, rounds: int) -> dict[int, list[int]]:
        sides = {"app": app, "raw": raw}
        samples: dict[str, list[float]] = {name: [] for name in sides}
        results: dict[int, list[int]] = {}
        names = list(sides)
        for round_ in range(rounds):
            for i, vector in enumerate(queries):
                shift = (i + round_) % len(names)
                for name in names[shift:] + names[:shift]:
                    started = time.perf_counter()
                    found = sides[name](vector)
                    samples[name].append(time.perf_counter() - started)
                    if name == "app":
                        results[i] = found
                    elif len(found) < k:
                        rounds_needed.append(i)
        app_s, raw_s = harness.latency_summary(samples["app"]), harness.latency_summary(samples["raw"])
        for stat in ("p50_ms", "p95_ms"):
            ratio = app_s[stat] / raw_s[stat]
            rows.append(harness.Row("chunks", f"search_vector over chunks {label} {stat[:3]}",
                                    app_s[stat], "ms", "raw SQL best chunk per row",
                                    raw_s[stat], ratio, "<= 1.2x" if stat == "p50_ms" else "",
                                    ratio <= 1.2 if stat == "p50_ms" else None))
        return results

    exact = measure("exact", rounds=1)
    indexes.build(EmbeddingVersion.objects.get(target=TARGET, version="v1"))
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {version.table}")
    hnsw = measure("HNSW", rounds=args.rounds)
    recall = float(np.mean([len(set(hnsw[i]) & set(exact[i])) / k for i in exact]))
    distinct = all(len(set(found)) == len(found) == k for found in hnsw.values())
    rows.append(harness.Row("chunks", f"HNSW rows recall@{k} against exact", recall, "",
                            "exact scan", 1.0, recall, "", None,
                            {"k_distinct_rows_every_query": distinct,
                             "raw_queries_with_fewer_than_k_rows": len(set(rounds_needed))}))
    harness.print_table(rows)
    print("results:", harness.write_json("chunks", rows, vars(args)))
    return rows


if __name__ == "__main__":
    main()
