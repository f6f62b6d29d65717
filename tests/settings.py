"""Test settings: the example project plus a tiny, locally made model for fast tests."""

from project.settings import *  # noqa: F403
from project.settings import DATA_DIR, EMBEDDINGS

TEST_MODELS_DIR = DATA_DIR / "test-models"

EMBEDDINGS = {
    **EMBEDDINGS,
    "MODELS": {
        **EMBEDDINGS["MODELS"],
        # A random-initialised 2-layer BERT with the MiniLM tokenizer (tests/tinymodel.py).
        "tiny": {"model": str(TEST_MODELS_DIR / "tiny-bert"), "revision": "tiny-seed-0"},
        "tiny_other": {"model": str(TEST_MODELS_DIR / "tiny-bert-seed1"), "revision": "tiny-seed-1"},
    },
}
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
