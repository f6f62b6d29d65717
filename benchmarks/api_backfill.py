"""Backfill through an embedding API that enforces a tokens-per-minute limit (a 429 with
Retry-After above it): the app's backfill on 2 worker processes sharing one rate limiter, against
a naive client loop (one request per row, the openai SDK's default retries) on a fresh instance
of the same server with the same limit.

The server is tests/embedding_servers.FaultServer (real HTTP on 127.0.0.1) counting tokens as the
client's bound does. Achieved tokens per minute = tokens the server answered / wall time
(dispatch to the run's end for the backfill; the loop's own duration for the naive loop).

Run: ``python -m benchmarks.api_backfill [--rows 20000] [--tpm 1000000] [--naive-seconds 180]``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import time

from benchmarks import harness

TARGET = "news.Article.embedding"
MODEL = "fault-embed-limited"  # the "api_limited" alias of tests/settings.py


def main(argv: list[str] | None = None) -> list[harness.Row]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--tpm", type=int, default=1_000_000)
    parser.add_argument("--naive-seconds", type=float, default=180.0,
                        help="time box of the naive loop (it may not finish the rows)")
    args = parser.parse_args(argv)

    from tests.embedding_servers import FaultServer

    key = f"sk-bench-{secrets.token_hex(8)}"
    server = FaultServer(api_key=key, tokens_per_minute=args.tpm)
    # Read by tests/settings.py here and in the worker processes.
    os.environ.update({
        "EMBEDDINGS_TEST_FAULT_URL": server.url, "EMBEDDINGS_TEST_FAULT_KEY": key,
        "EMBEDDINGS_TEST_LIMITED_TPM": str(args.tpm),
        "EMBEDDINGS_TEST_LIMITED_RPM": str(args.tpm),  # tokens bind, not requests
        "EMBEDDINGS_TEST_LIMITED_INPUTS": "2048", "EMBEDDINGS_TEST_LIMITED_TIMEOUT": "60"})
    harness.setup_django()
    from django.core.management import call_command

    from embeddings_app import backfill, tasks
    from embeddings_app.models import EmbeddingVersion, ProviderPause, ProviderUsage
    from project.news.models import Article
    from tests.workers import WorkerProcess, wait_for_run

    harness.reset_articles()
    ProviderUsage.objects.all().delete()
    ProviderPause.objects.all().delete()
    sentences = harness.real_sentences(args.rows)
    Article.objects.bulk_create([Article(title=f"Sentence {i}", body=text)
                                 for i, text in enumerate(sentences)],
                                batch_size=5000)
    rows = len(sentences)
    call_command("embeddings", "add", TARGET, "v1", "--model", "api_limited", verbosity=0)
    version = EmbeddingVersion.objects.get(target=TARGET, version="v1")
    time.sleep(61)  # the server's minute forgets add's probe requests
    server.reset()
    workers = WorkerProcess(concurrency=2, extra_env={"OMP_NUM_THREADS": "1"}, name="bench")
    try:
        started = time.monotonic()
        run, ranges = backfill.start(version, mode="celery")
        tasks.dispatch(run, ranges)
        run = wait_for_run(run.pk, timeout=3600, poll=0.5)
        ours_seconds = time.monotonic() - started
    finally:
        workers.stop()
    log = server.requests_for(MODEL)
    ours_tokens = sum(r.tokens for r in log if r.status == 200)
    ours_429 = sum(1 for r in log if r.status == 429)
    ours_tpm = ours_tokens * 60 / ours_seconds
    server.stop()

    naive = naive_loop(sentences, args.tpm, args.naive_seconds)
    rows_out = [
        harness.Row("api_backfill", "achieved tokens/min, backfill (2 workers, shared limiter)",
                    ours_tpm, "tokens/min", baseline="naive loop", baseline_value=naive["tpm"],
                    ratio=ours_tpm / naive["tpm"] if naive["tpm"] else None,
                    target=">= 0.9x the limit, 0 failed rows",
                    met=ours_tpm >= 0.9 * args.tpm and run.rows_failed == 0,
                    extra={"limit_tpm": args.tpm, "of_limit": ours_tpm / args.tpm,
                           "rows": rows, "rows_embedded": run.rows_embedded,
                           "rows_failed": run.rows_failed, "requests": len(log),
                           "http_429": ours_429, "seconds": ours_seconds}),
        harness.Row("api_backfill", "achieved tokens/min, naive loop (1 request per row)",
                    naive["tpm"], "tokens/min", baseline="limit", baseline_value=args.tpm,
                    ratio=naive["tpm"] / args.tpm, extra=naive),
    ]
    harness.print_table(rows_out)
    print(f"backfill: {run.rows_embedded}/{rows} rows embedded, {run.rows_failed} failed, "
          f"{len(log)} requests, {ours_429} answered 429, {ours_seconds:.0f}s; naive loop: "
          f"{naive['embedded']} embedded, {naive['failed']} failed after the SDK's retries, "
          f"{naive['http_429']} answered 429, in {naive['seconds']:.0f}s")
    print("results:", harness.write_json("api_backfill", rows_out,
                                         {"rows": args.rows, "tpm": args.tpm,
                                          "naive_seconds": args.naive_seconds}))
    return rows_out


def naive_loop(texts: list[str], tpm: int, seconds: float) -> dict[str, float]:
    """One request per row with the SDK's defaults (2 retries honouring Retry-After), on a fresh
    server with the same limit, until every row is tried or ``seconds`` have passed."""
    import openai

    from tests.embedding_servers import FaultServer

    key = f"sk-bench-{secrets.token_hex(8)}"
    server = FaultServer(api_key=key, tokens_per_minute=tpm)
    client = openai.OpenAI(api_key=key, base_url=server.url)
    embedded = failed = 0
    started = time.monotonic()
    for text in texts:
        if time.monotonic() - started > seconds:
            break
        try:
            client.embeddings.create(model="naive", input=text, encoding_format="float")
            embedded += 1
        except openai.APIError:
            failed += 1
    elapsed = time.monotonic() - started
    log = server.requests_for("naive")
    server.stop()
    tokens = sum(r.tokens for r in log if r.status == 200)
    return {"tpm": tokens * 60 / elapsed, "embedded": embedded, "failed": failed,
            "tried": embedded + failed, "requests": len(log),
            "http_429": sum(1 for r in log if r.status == 429), "seconds": elapsed}


if __name__ == "__main__":
    main()
