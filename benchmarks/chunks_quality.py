"""Quality of a chunked version (embeddings_app.chunking) on the BBC News articles: does
embedding all-mpnet-base-v2's chunks win back what its 128-token limit cuts off?

Three versions of the same articles, each backfilled inline, searched exactly (no index: the
figures are the models' and the layout's, not HNSW's):

* ``v1``: all-MiniLM-L6-v2, whole rows (reads 256 tokens), the demo's old version;
* ``v2``: all-mpnet-base-v2 as pinned (``max_seq_length`` 128), whole rows, the demo's new one;
* ``v2c``: the same model, chunked (``--chunks`` 126 by default: 128 less its two special tokens,
  the largest chunk it reads whole; ``--overlap`` 0).

Scored per version with compare's recall@k and nDCG@k (``compare._scores``), each query encoded
with the version's model and searched as ``compare`` does (``search._nearest``):

* **proxy**: ``compare.proxy_queries`` (one sentence out of a sampled article, that article the
  one relevant row; seed 0);
* **titles**: a relevance file derived from the corpus: each article's title as the query, its
  own article the one relevant row (the title is the start of every version's source text, so
  this favours no layout: whole rows keep their first 128 tokens too);
* **categories**: the five category names (business, entertainment, politics, sports, tech) as
  queries, every article of that category relevant. recall@10 is at most 10 / (the category's
  articles): 0.25 with the default 200 articles (40 per category); nDCG@10 (precision-like) is
  the figure to read there.

mpnet on this shared 2-core machine encodes 1 to 3 sequences/s under load, so the default is 200
articles (1,025 chunks of <= 126 tokens): about 10 minutes.

Run: ``python -m benchmarks.chunks_quality [--docs N] [--chunks TOKENS] [--overlap TOKENS]``.
"""

from __future__ import annotations

import argparse
import os
import time

from benchmarks import harness

TARGET = "news.Article.embedding"
VERSIONS = (("v1", "minilm", None), ("v2", "mpnet", None), ("v2c", "mpnet", "chunks"))


def main(argv: list[str] | None = None) -> list[harness.Row]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--chunks", type=int, default=126, help="tokens per chunk of v2c")
    parser.add_argument("--overlap", type=int, default=0)
    parser.add_argument("--proxy", type=int, default=100, help="proxy queries")
    parser.add_argument("--titles", type=int, default=200, help="title queries (at most --docs)")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args(argv)

    harness.setup_django()
    from django.conf import settings

    from embeddings_app import backfill, compare, encoders, lifecycle, registry, search
    from embeddings_app.models import EmbeddingVersion, State
    from project.news import provision
    from project.news.models import Article

    provision.provision(settings.MODELS_DIR)  # mpnet's model cache, as the demo assembles it
    harness.reset_articles()
    harness.insert_corpus_articles(args.docs)
    field = registry.get(TARGET)
    load = {"start": os.getloadavg()}
    built: dict[str, dict[str, float]] = {}
    for name, alias, chunked in VERSIONS:
        version = lifecycle.add(TARGET, name, alias, layout="table" if chunked else "column",
                                chunks=args.chunks if chunked else 0,
                                overlap=args.overlap if chunked else None)
        run, ranges = backfill.start(version, batch_size=64, mode="inline")
        started = time.perf_counter()
        backfill.run_inline(run, ranges)
        seconds = time.perf_counter() - started
        version.refresh_from_db()
        assert version.state == State.READY, (name, version.state)
        built[name] = {"seconds": round(seconds, 1),
                       "vectors": version.store.vector_count()}
        print(f"{name} ({alias}{f', chunks of {args.chunks}' if chunked else ''}): "
              f"{built[name]['vectors']} vectors in {seconds:.0f} s", flush=True)
    load["after_backfill"] = os.getloadavg()

    articles = list(Article.objects.order_by("pk").values_list("pk", "title", "category"))
    query_sets: dict[str, list[compare.Query]] = {
        "proxy": compare.proxy_queries(TARGET, args.proxy, seed=0),
        "titles": [compare.Query(title, {str(pk)}) for pk, title, _ in articles[:args.titles]],
        "categories": [
            compare.Query(category, {str(pk) for pk, _, c in articles if c == category})
            for category in sorted({c for _, _, c in articles})],
    }
    versions = {name: EmbeddingVersion.objects.get_version(TARGET, name)
                for name, _, _ in VERSIONS}
    k = args.k
    scores: dict[tuple[str, str], tuple[float, float]] = {}
    for set_name, queries in query_sets.items():
        for name, version in versions.items():
            encoder = encoders.for_version(version)
            recall = ndcg = 0.0
            for query in queries:
                vector = encoder.encode_query(query.text)
                found = [str(obj.pk) for obj in search._nearest(field, version, vector, k, None)]
                r, n = compare._scores(found, query.relevant, k)
                recall, ndcg = recall + r, ndcg + n
            scores[(set_name, name)] = (recall / len(queries), ndcg / len(queries))
    load["end"] = os.getloadavg()

    rows: list[harness.Row] = []
    for set_name, queries in query_sets.items():
        for metric, index in ((f"recall@{k}", 0), (f"nDCG@{k}", 1)):
            chunked = scores[(set_name, "v2c")][index]
            for base in ("v2", "v1"):
                baseline = scores[(set_name, base)][index]
                rows.append(harness.Row(
                    "chunks_quality", f"{set_name} ({len(queries)} queries) {metric} v2c "
                    f"(mpnet, chunks of {args.chunks})", chunked, "",
                    f"{base} ({'mpnet' if base == 'v2' else 'minilm'}, whole rows)", baseline,
                    chunked / baseline if baseline else None))
    harness.print_table(rows)
    for name, figure in built.items():
        print(f"  {name}: {figure['vectors']} vectors, backfill {figure['seconds']} s")
    print("  load average (1, 5, 15 min):", {key: tuple(round(v, 2) for v in value)
                                             for key, value in load.items()})
    print("results:", harness.write_json("chunks_quality", rows,
                                         {**vars(args), "built": built, "load": load}))
    return rows


if __name__ == "__main__":
    main()
