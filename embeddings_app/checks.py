"""Django system checks: a bad EMBEDDINGS setting is reported by `manage.py check`."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks

from . import config


@checks.register("embeddings")
def check_embeddings_setting(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    raw = getattr(settings, "EMBEDDINGS", None)
    return [
        checks.Error(problem.message, hint=problem.hint, id=problem.id)
        for problem in config.validate(raw)
    ]
