"""One operator of tests/test_lifecycle_random.py, as a process of its own: random lifecycle
steps (the `embeddings` command's, and `lifecycle.drop` within the grace period rules) against
the versions of one target until the time is up; one JSON line per step on stdout.

Usage: python -m tests.random_operator SEED SECONDS
"""

from __future__ import annotations

import io
import json
import random
import sys
import time
import traceback

VERSIONS = [f"v{n}" for n in range(1, 10)]  # names are never reused: room to add
TARGET = "news.Article.embedding"


def step(rng: random.Random) -> tuple[str, list[str]]:
    """A random step: (kind, arguments of `manage.py embeddings`)."""
    version = rng.choice(VERSIONS)
    kind = rng.choices(
        ["activate", "activate --force", "rollback", "retire", "drop", "backfill", "verify",
         "index", "add"],
        weights=[3, 2, 2, 1, 1, 3, 3, 2, 2])[0]
    if kind == "activate --force":
        return kind, ["activate", TARGET, version, "--force"]
    if kind == "rollback":
        return kind, ["rollback", TARGET]
    if kind == "backfill":
        return kind, ["backfill", TARGET, version, "--inline", "--batch-size", "40"]
    if kind == "add":
        return kind, ["add", TARGET, version, "--model", rng.choice(["tiny", "tiny_other"])]
    return kind, [kind, TARGET, version]


def main() -> None:
    seed, seconds = int(sys.argv[1]), float(sys.argv[2])
    import django

    django.setup()
    from django.core.management import call_command
    from django.core.management.base import CommandError

    from embeddings_app import lifecycle
    from embeddings_app.exceptions import EmbeddingError

    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        kind, args = step(rng)
        started = time.time()
        detail = ""
        try:
            if kind == "drop":  # the API: the grace period after deactivation applies
                lifecycle.drop(TARGET, args[2], actor="random")
            else:
                call_command("embeddings", *args, stdout=io.StringIO(), stderr=io.StringIO())
            outcome = "ok"
        except (CommandError, EmbeddingError) as exc:
            outcome, detail = "refused", str(exc)
        except Exception:  # reported by the test: a step must succeed or refuse cleanly
            outcome, detail = "error", traceback.format_exc()
        print(json.dumps({"kind": kind, "args": args[1:], "start": started, "end": time.time(),
                          "outcome": outcome, "detail": detail[-3000:]}), flush=True)


if __name__ == "__main__":
    main()
