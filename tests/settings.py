"""Test settings: the example project plus a tiny, locally made model for fast tests."""

import os

from project.settings import *  # noqa: F403
from project.settings import DATA_DIR, EMBEDDINGS, _packaged_minilm

TEST_MODELS_DIR = DATA_DIR / "test-models"

EMBEDDINGS = {
    **EMBEDDINGS,
    "MODELS": {
        **EMBEDDINGS["MODELS"],
        # A random-initialised 2-layer BERT with the MiniLM tokenizer (tests/tinymodel.py).
        "tiny": {"model": str(TEST_MODELS_DIR / "tiny-bert"), "revision": "tiny-seed-0"},
        # The packaged MiniLM in half precision (`derive --storage halfvec`, tests/test_derive.py).
        "minilm_half": {**EMBEDDINGS["MODELS"]["minilm"], "storage": "halfvec"},
        "tiny_other": {"model": str(TEST_MODELS_DIR / "tiny-bert-seed1"), "revision": "tiny-seed-1"},
        # Embedding APIs (tests/embedding_servers.py): the session fixtures start the servers and
        # set these URLs (worker processes read them from the environment).
        # infinity-emb serving the packaged MiniLM folder; the folder's tokenizer counts tokens.
        "api_minilm": {
            "provider": "openai", "model": _packaged_minilm(),
            "revision": "c9745ed1d9f207416be6d2e6f8de32d1f16199bf",
            "base_url": os.environ.get("EMBEDDINGS_TEST_INFINITY_URL", "http://127.0.0.1:9"),
        },
        # The fault-injecting server; a key it checks; a short timeout for its "timeout" fault.
        "api_fault": {
            "provider": "openai", "model": "fault-embed-1", "revision": "2026-12-01",
            "base_url": os.environ.get("EMBEDDINGS_TEST_FAULT_URL", "http://127.0.0.1:9"),
            "api_key_env": "EMBEDDINGS_TEST_FAULT_KEY", "timeout": 1.0, "max_batch_inputs": 4,
        },
        # The same server under rate limits small enough to bind within seconds.
        "api_limited": {
            "provider": "openai", "model": "fault-embed-limited", "revision": "2026-12-01",
            "base_url": os.environ.get("EMBEDDINGS_TEST_FAULT_URL", "http://127.0.0.1:9"),
            # The benchmark (benchmarks/api_backfill.py) sets its own limits and batch size.
            "api_key_env": "EMBEDDINGS_TEST_FAULT_KEY",
            "timeout": float(os.environ.get("EMBEDDINGS_TEST_LIMITED_TIMEOUT", "1")),
            "max_batch_inputs": int(os.environ.get("EMBEDDINGS_TEST_LIMITED_INPUTS", "2")),
            "tokens_per_minute": int(os.environ.get("EMBEDDINGS_TEST_LIMITED_TPM", "12000")),
            "requests_per_minute": int(os.environ.get("EMBEDDINGS_TEST_LIMITED_RPM", "120")),
            "price_per_million_tokens": 0.02,
        },
    },
}
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
# Worker processes started by a test of the logical change capture read the mode from here.
if os.environ.get("EMBEDDINGS_TEST_CHANGE_CAPTURE") == "logical":
    EMBEDDINGS["CHANGE_CAPTURE"] = "logical"
