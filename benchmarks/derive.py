"""``derive --dimensions`` against re-embedding the same rows with the model at that size.

``--rows`` BBC News sentences (real text), v1 = MiniLM (384 dimensions) backfilled. Then, timed:

* ``derive.derive`` of v2 from v1 with ``--dimensions 256`` (alias ``minilm256``: MiniLM with
  ``truncate_dim`` 256) plus the backfill that follows it (nothing left to embed);
* baseline: v3 added with the same ``minilm256`` alias and backfilled inline: the model run over
  every row.

And recall@10 of the derived vectors against exact search on the parent: for ``--queries``
sentences, the exact top 10 by the derived 256-dimension vectors (query by ``minilm256``) against
the exact top 10 by v1's 384-dimension vectors (query by ``minilm``); both exhaustive, so the
figure is the truncation's, not an index's.

Run: ``python -m benchmarks.derive [--rows N] [--queries Q]``. At 100,000 x 768 (mpnet), and for
``--storage bit`` with its re-rank: ``benchmarks/derive_scale.py``.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks import harness

TARGET = "news.Article.embedding"


def main(argv: list[str] | None = None) -> list[harness.Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--queries", type=int, default=100)
    args = parser.parse_args(argv)
    harness.setup_django()
    from embeddings_app import backfill, derive, encoders, lifecycle
    from embeddings_app.config import get_config
    from project.news.models import Article

    harness.reset_articles()
    texts = harness.real_sentences(args.rows + args.queries)
    documents, queries = texts[:args.rows], texts[args.rows:]
    Article.objects.bulk_create([Article(title=text[:300], body="") for text in documents])

    def backfill_inline(version: object) -> None:
        run, ranges = backfill.start(version, batch_size=256, mode="inline")  # type: ignore[arg-type]
        backfill.run_inline(run, ranges)

    v1 = lifecycle.add(TARGET, "v1", "minilm")
    with harness.stopwatch() as parent:
        backfill_inline(v1)
    print(f"v1 (minilm, 384) backfilled: {args.rows:,} rows in {parent['seconds']:.1f}s")

    with harness.stopwatch() as derived:
        v2, report = derive.derive(TARGET, "v2", "v1", dimensions=256)
        backfill_inline(v2)
    print(f"v2 derived: {report.adopted:,} vectors in {derived['seconds']:.1f}s")
    with harness.stopwatch() as embedded:
        v3 = lifecycle.add(TARGET, "v3", "minilm256")
        backfill_inline(v3)
    print(f"v3 re-embedded with minilm256: {embedded['seconds']:.1f}s")

    full, cut = v1.store.read_all(), v2.store.read_all()
    keys = list(full)
    full_matrix = np.vstack([full[pk][0] for pk in keys])
    cut_matrix = np.vstack([cut[pk][0] for pk in keys])
    full_model = encoders.load(get_config().model("minilm"))
    cut_model = encoders.load(get_config().model("minilm256"))
    recalls = []
    for query in queries:
        exact = set(np.argsort(-(full_matrix @ full_model.encode_query(query)))[:10])
        found = set(np.argsort(-(cut_matrix @ cut_model.encode_query(query)))[:10])
        recalls.append(len(exact & found) / 10)
    recall = float(np.mean(recalls))
    rows = [
        harness.Row("derive", f"derive {args.rows:,} x 384 -> 256 (+ its backfill)",
                    derived["seconds"], "s", baseline="re-embedding with minilm256 (add + backfill)",
                    baseline_value=embedded["seconds"],
                    ratio=embedded["seconds"] / derived["seconds"], target=">= 20x",
                    met=embedded["seconds"] / derived["seconds"] >= 20),
        harness.Row("derive", f"recall@10 of the derived 256 dims vs exact search on the parent "
                    f"({len(queries)} queries)", recall, "", baseline="exact top 10 on v1 (384)"),
    ]
    harness.print_table(rows)
    print("results:", harness.write_json("derive", rows, {"rows": args.rows,
                                                          "queries": len(queries)}))
    harness.reset_articles()
    return rows


if __name__ == "__main__":
    main()
