"""The lifecycle steps and their refusal rules: one code path for commands and the admin.

Every step either completes or raises an ``EmbeddingError`` (``Refused`` and its subclasses) with
one line saying why and what to do, having changed nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from django.db import connection, transaction
from django.utils import timezone

from . import encoders, registry, storage, sync
from .config import MAX_INDEXED_VECTOR_DIMENSIONS, get_config
from .exceptions import Refused, VersionNotReady
from .models import EmbeddingVersion, State, VersionEvent

VERSION_NAME = re.compile(r"[a-z][a-z0-9_]{0,30}")


def transition(version: EmbeddingVersion, to_state: str, *, actor: str = "", note: str = "") -> None:
    """Change ``version``'s state and record who did it (inside the caller's transaction)."""
    now = timezone.now()
    VersionEvent.objects.create(version=version, from_state=version.state, to_state=to_state,
                                actor=actor, note=note, at=now)
    version.state = to_state
    version.state_changed_at = now
    fields = ["state", "state_changed_at"]
    if to_state == State.ACTIVE:
        version.activated_at = now
        fields.append("activated_at")
    elif version.activated_at and to_state == State.STANDBY:
        version.deactivated_at = now
        fields.append("deactivated_at")
    version.save(update_fields=fields)


def add(target: str, version_name: str, alias: str, *, actor: str = "") -> EmbeddingVersion:
    """Register a version: load its model once (real dimension, fingerprint), add its column."""
    field = registry.get(target)
    if not VERSION_NAME.fullmatch(version_name or ""):
        raise Refused(
            f'Invalid version name "{version_name}": use a lowercase letter then up to 30 '
            "lowercase letters, digits or underscores (e.g. v2)."
        )
    if EmbeddingVersion.objects.filter(target=target, version=version_name).exists():
        raise Refused(
            f'{target} already has a version "{version_name}" (names are never reused, even '
            "after drop); choose another name."
        )
    spec = get_config().model(alias)
    encoder = encoders.load(spec)
    if spec.dimensions is not None and spec.dimensions != encoder.dimensions:
        raise Refused(
            f'Model alias "{alias}" declares {spec.dimensions} dimensions but the model outputs '
            f"{encoder.dimensions}; fix \"dimensions\" (or set truncate_dim)."
        )
    storage_type = spec.storage or (
        "halfvec" if encoder.dimensions > MAX_INDEXED_VECTOR_DIMENSIONS else "vector"
    )
    if storage_type == "vector" and encoder.dimensions > MAX_INDEXED_VECTOR_DIMENSIONS:
        raise Refused(
            f"{encoder.dimensions} dimensions cannot be indexed as vector (pgvector's limit is "
            f'{MAX_INDEXED_VECTOR_DIMENSIONS}); use "storage": "halfvec" for alias "{alias}".'
        )
    storage.check_new_columns(field, version_name)
    with transaction.atomic():
        version = EmbeddingVersion.objects.create(
            target=target, version=version_name, model_alias=alias, model_name=spec.model,
            revision=spec.revision, fingerprint=encoder.fingerprint,
            encode_settings=spec.encode_settings(), dimensions=encoder.dimensions,
            storage=storage_type, column=field.column(version_name),
            hash_column=field.hash_column(version_name), state=State.NEW,
        )
        VersionEvent.objects.create(version=version, to_state=State.NEW, actor=actor,
                                    note=f"added with {spec.model}@{spec.revision}")
        storage.add_columns(field, version_name, storage_type, encoder.dimensions)
    return version


@dataclass(frozen=True)
class Readiness:
    done: int
    total: int
    stale: int

    @property
    def problems(self) -> list[str]:
        problems = []
        if self.done < self.total:
            problems.append(f"{self.total - self.done} of {self.total} rows have no vector")
        if self.stale:
            problems.append(f"{self.stale} rows are stale")
        return problems


def readiness(version: EmbeddingVersion) -> Readiness:
    field = registry.get(version.target)
    done, total = storage.coverage(field, version)
    (stale,) = sync.count_stale(field, [version])
    return Readiness(done, total, stale)


ACTIVATABLE_STATES = (State.READY, State.STANDBY)
FORCIBLE_STATES = (State.NEW, State.BACKFILLING, State.FAILED, State.READY, State.STANDBY)


def activate(target: str, version_name: str, *, force: bool = False, actor: str = "") -> list[str]:
    """The atomic flip of reads to ``version_name``. Returns warnings (``--force`` overrides)."""
    version = EmbeddingVersion.objects.get_version(target, version_name)
    if version.state == State.ACTIVE:
        raise Refused(f"{version} is already active.")
    allowed = FORCIBLE_STATES if force else ACTIVATABLE_STATES
    if version.state not in allowed:
        raise VersionNotReady(
            f"{version} is {version.state}; only a ready (or standby) version can be activated"
            + ("." if version.state in FORCIBLE_STATES else
               " and a retired or dropped one never (it is not kept fresh); add a new version.")
            + (f" Run `manage.py embeddings backfill {target} {version_name}` first."
               if version.state in FORCIBLE_STATES else "")
        )
    ready = readiness(version)
    warnings = []
    if ready.problems:
        message = f"{version} is not complete and fresh: {'; '.join(ready.problems)}"
        if not force:
            raise VersionNotReady(
                f"{message}; run `manage.py embeddings backfill {target} {version_name}` first."
            )
        warnings.append(f"--force: activating anyway; {message}.")
    _flip(target, version, actor=actor, note="activate" + (" (forced)" if force else ""))
    return warnings


def rollback(target: str, *, actor: str = "") -> EmbeddingVersion:
    """Reactivate the most recently active version that was kept fresh (standby)."""
    registry.get(target)
    previous = (EmbeddingVersion.objects.for_target(target).filter(state=State.STANDBY)
                .order_by("-deactivated_at", "-id").first())
    if previous is None:
        raise Refused(
            f"{target} has no standby version to roll back to (a retired version is no longer "
            "kept fresh); activate a ready version instead."
        )
    _flip(target, previous, actor=actor, note="rollback")
    return previous


def _flip(target: str, version: EmbeddingVersion, *, actor: str, note: str) -> None:
    with transaction.atomic():
        # Lock every version of the target: concurrent flips serialize here.
        versions = {v.pk: v for v in EmbeddingVersion.objects.for_target(target)
                    .select_for_update().order_by("pk")}
        version = versions[version.pk]
        for other in versions.values():
            if other.state == State.ACTIVE:
                transition(other, State.STANDBY, actor=actor, note=f"{note}: replaced by {version}")
        transition(version, State.ACTIVE, actor=actor, note=note)


def retire(target: str, version_name: str, *, actor: str = "") -> EmbeddingVersion:
    """Stop writing a non-active version."""
    version = EmbeddingVersion.objects.get_version(target, version_name)
    if version.state == State.ACTIVE:
        raise Refused(
            f"{version} is active and cannot be retired; activate another version first."
        )
    if version.state in (State.RETIRED, State.DROPPED):
        raise Refused(f"{version} is already {version.state}.")
    with transaction.atomic():
        transition(version, State.RETIRED, actor=actor, note="retire")
    return version


def check_droppable(version: EmbeddingVersion) -> None:
    if version.state == State.ACTIVE:
        raise Refused(f"{version} is active and cannot be dropped; activate another version first.")
    if version.state != State.RETIRED:
        raise Refused(
            f"{version} is {version.state}; only a retired version can be dropped: run "
            f"`manage.py embeddings retire {version.target} {version.version}` first."
        )


def drop(target: str, version_name: str, *, actor: str = "") -> list[str]:
    """Drop a retired version's indexes and columns; the version row stays as history."""
    version = EmbeddingVersion.objects.get_version(target, version_name)
    field = registry.get(target)
    check_droppable(version)
    if connection.in_atomic_block:
        raise Refused("drop cannot run inside a transaction (it drops indexes concurrently).")
    dropped_indexes = storage.drop_columns(version, field)
    with transaction.atomic():
        transition(version, State.DROPPED, actor=actor,
                   note="drop: columns and indexes " + (", ".join(dropped_indexes) or "(none)"))
    return dropped_indexes
