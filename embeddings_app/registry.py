"""Every ``VersionedEmbedding`` declared on a model, by target name ``app_label.Model.field``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.db import models

from .exceptions import UnknownTarget

if TYPE_CHECKING:
    from .fields import VersionedEmbedding

_targets: dict[str, VersionedEmbedding] = {}


def register(field: VersionedEmbedding) -> None:
    _targets[field.target] = field


def get(target: str) -> VersionedEmbedding:
    try:
        return _targets[target]
    except KeyError:
        known = ", ".join(sorted(_targets)) or "none"
        raise UnknownTarget(
            f'Unknown target "{target}"; expected app_label.Model.field, one of: {known}.'
        ) from None


def all_targets() -> list[str]:
    return sorted(_targets)


def fields_of(model: type[models.Model]) -> list[VersionedEmbedding]:
    """The embedded fields declared on ``model`` (concrete model, proxies resolved)."""
    concrete = model._meta.concrete_model
    return [field for field in _targets.values() if field.model is concrete]
