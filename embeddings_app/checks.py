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


@checks.register("embeddings", deploy=True)
def check_active_fingerprints(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """``manage.py check --deploy``: the model files behind every active version still match the
    fingerprint pinned when the version was added (a changed file would silently change the
    query vectors, which would then be searched against vectors of the old model)."""
    if config.validate(getattr(settings, "EMBEDDINGS", None)):
        return []  # reported by check_embeddings_setting
    from django.db import DatabaseError

    from .encoders import fingerprint, resolve_model_path
    from .exceptions import EmbeddingError
    from .models import EmbeddingVersion, State

    try:
        active_versions = list(EmbeddingVersion.objects.filter(state=State.ACTIVE))
    except DatabaseError as exc:
        return [checks.Warning(
            f"Could not read the active embedding versions: {exc}".strip(),
            hint="Run `manage.py migrate`, or run this check where the database is reachable.",
            id="embeddings.W101",
        )]
    parsed = config.get_config()
    messages: list[checks.CheckMessage] = []
    for version in active_versions:
        try:
            spec = parsed.model(version.model_alias)
            current = fingerprint(resolve_model_path(spec), spec)
        except EmbeddingError as exc:
            messages.append(checks.Error(
                f"The model of active version {version} cannot be checked: {exc}",
                hint="Restore the model files or the alias, or activate another version.",
                id="embeddings.E102",
            ))
            continue
        if current != version.fingerprint:
            messages.append(checks.Error(
                f"The model files behind active version {version} (alias "
                f'"{version.model_alias}") changed: fingerprint {current[:12]} != pinned '
                f"{version.fingerprint[:12]}.",
                hint="Searches would embed queries with other model files than the stored "
                "vectors. Restore the pinned files, or add a new version for the new files "
                "and migrate to it.",
                id="embeddings.E101",
            ))
    return messages
