"""save() latency per dual-write mode (sync, on_commit, celery) against a plain save of the same
model with the dual-write receiver disconnected. One version active (MiniLM).

Run: ``python -m benchmarks.dualwrite [--saves N]``.
"""

from __future__ import annotations

import argparse
import copy
import time

from benchmarks import harness

TARGET = "news.Article.embedding"


def main(argv: list[str] | None = None) -> list[harness.Row]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--saves", type=int, default=100)
    parser.add_argument("--docs", type=int, default=300)
    args = parser.parse_args(argv)

    harness.setup_django()
    from django.conf import settings
    from django.db.models.signals import post_save

    from embeddings_app import backfill, lifecycle, signals
    from embeddings_app.models import EmbeddingVersion
    from project.celery import app as celery_app
    from project.news.models import Article

    harness.reset_articles()
    harness.insert_corpus_articles(args.docs)
    version = lifecycle.add(TARGET, "v1", "minilm")
    run, ranges = backfill.start(version, mode="inline")
    backfill.run_inline(run, ranges)
    lifecycle.activate(TARGET, "v1", force=True)  # save latency is measured, not the cutover
    assert EmbeddingVersion.objects.get(target=TARGET, version="v1").state == "active"

    articles = list(Article.objects.order_by("pk")[: args.saves])
    counter = iter(range(10**9))

    def save_all() -> list[float]:
        samples = []
        for article in articles:
            article.body = f"{article.body.split(' [edit')[0]} [edit {next(counter)}]"
            started = time.perf_counter()
            article.save()
            samples.append(time.perf_counter() - started)
        return samples

    results: dict[str, dict[str, float]] = {}
    uid = f"embeddings:{TARGET}"
    assert post_save.disconnect(sender=Article, dispatch_uid=uid), "dual-write was not connected"
    save_all()  # warm-up
    results["plain"] = harness.latency_summary(save_all())
    post_save.connect(signals.embed_saved_row, sender=Article, dispatch_uid=uid)

    original = copy.deepcopy(settings.EMBEDDINGS)
    for mode in ("sync", "on_commit", "celery"):
        settings.EMBEDDINGS = {**original, "DUAL_WRITE": mode}
        save_all()  # warm-up (model loaded, broker connected)
        results[mode] = harness.latency_summary(save_all())
    settings.EMBEDDINGS = original
    with celery_app.connection_for_write() as conn:  # the refresh tasks the celery mode queued
        purged = conn.default_channel.queue_purge(original.get("QUEUE", "embeddings")) or 0

    rows = []
    for mode in ("sync", "on_commit", "celery"):
        for stat in ("p50_ms", "p95_ms"):
            rows.append(harness.Row(
                "dual-write", f"save() {mode} {stat[:3]}", results[mode][stat], "ms",
                "plain save()", results["plain"][stat], results[mode][stat] / results["plain"][stat],
            ))
    harness.print_table(rows)
    print(f"({purged} refresh tasks queued by the celery mode were purged)")
    print("results:", harness.write_json("dualwrite", rows, {"saves": args.saves}))
    return rows


if __name__ == "__main__":
    main()
