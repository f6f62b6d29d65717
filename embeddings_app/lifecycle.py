"""The lifecycle steps and their refusal rules: one code path for commands and the admin.

Every step either completes or raises an ``EmbeddingError`` (``Refused`` and its subclasses) with
one line saying why and what to do, having changed nothing.

The locking rule: every state change of a target's versions (add, backfill start and finish,
activate, rollback, retire, drop; the ``migrate`` command and the admin call these same
functions) runs inside ``locked_versions(target)``, which locks all of the target's
``EmbeddingVersion`` rows in primary-key order (``SELECT ... FOR UPDATE``) after a transaction
advisory lock of the target (so that ``add``, which creates a row, and a target without versions
serialize too). Preconditions are checked again on the locked rows, never on an earlier read: two
operators' steps on one target run one after the other, and whatever their interleaving a retired
or dropped version never becomes active, and the active and standby versions are always written.
Slow work (``activate``'s readiness scan, ``drop``'s DDL, a backfill's batches) runs outside the
lock; ``drop`` commits ``dropped`` first, so a version never serves or is written once its columns
start to go. The database keeps enforcing one active version per target (a unique index).
"""

from __future__ import annotations

import re
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import psycopg
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from . import (
    active,
    capture,
    chunking,
    encoders,
    indexes,
    limits,
    probes,
    registry,
    shadow,
    stores,
    sync,
    truncation,
)
from .config import MAX_INDEXED_VECTOR_DIMENSIONS, ModelSpec, get_config
from .exceptions import Refused, VersionNotReady
from .indexes import BuildPlan, Progress
from .models import EmbeddingVersion, State, VersionEvent
from .verify import VerifyReport
from .verify import verify as run_verify

if TYPE_CHECKING:
    from .fields import VersionedEmbedding

VERSION_NAME = re.compile(r"[a-z][a-z0-9_]{0,30}")


@contextmanager
def locked_versions(target: str) -> Iterator[dict[int, EmbeddingVersion]]:
    """A transaction holding the target's lifecycle lock: every version of ``target`` (pk ->
    the row as locked, freshly read), locked ``FOR UPDATE`` in primary-key order. Check a step's
    preconditions on these rows, then change them with ``transition()``."""
    with transaction.atomic():
        with connection.cursor() as cursor:
            # Two 32-bit keys: a constant for this app, a hash of the target.
            cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)",
                           [LOCK_NAMESPACE, _signed32(zlib.crc32(target.encode()))])
        yield {v.pk: v for v in EmbeddingVersion.objects.for_target(target)
               .select_for_update().order_by("pk")}


LOCK_NAMESPACE = 0x656D62  # "emb": the first key of the targets' advisory locks


def _signed32(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value


def locked_version(target: str, versions: dict[int, EmbeddingVersion],
                   version: EmbeddingVersion) -> EmbeddingVersion:
    """``version`` as locked by ``locked_versions`` (refused if it was deleted meanwhile)."""
    try:
        return versions[version.pk]
    except KeyError:
        raise Refused(f"{version} no longer exists; see `manage.py embeddings status "
                      f"{target}`.") from None


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
    if version.rollout_percent:  # the candidate itself moves on (activated, retired, ...)
        version.rollout_percent = 0
        fields.append("rollout_percent")
        if to_state != State.ACTIVE:
            version.deactivated_at = now
            fields.append("deactivated_at")
    if to_state == State.ACTIVE:  # a flip or a rollback ends any other rollout
        EmbeddingVersion.objects.filter(target=version.target, rollout_percent__gt=0).exclude(
            pk=version.pk).update(rollout_percent=0, deactivated_at=now)
    if to_state in SHADOW_ENDING_STATES:  # activate, rollback, retire, drop: shadow reads end
        EmbeddingVersion.objects.filter(target=version.target, shadow_rate__gt=0).exclude(
            pk=version.pk).update(shadow_rate=0.0)
        if version.shadow_rate:
            version.shadow_rate = 0.0
            fields.append("shadow_rate")
    version.save(update_fields=fields)


# A step that moves a version into one of these ends the target's shadow reads (shadow.py).
SHADOW_ENDING_STATES = (State.ACTIVE, State.RETIRED, State.DROPPED)


def record_event(version: EmbeddingVersion, *, actor: str = "", note: str) -> None:
    """Record a change of ``version`` that is not a change of state (e.g. shadow reads)."""
    VersionEvent.objects.create(version=version, from_state=version.state,
                                to_state=version.state, actor=actor, note=note)


def add(target: str, version_name: str, alias: str, *, layout: str | None = None,
        chunks: int | None = None, overlap: int | None = None,
        actor: str = "") -> EmbeddingVersion:
    """Register a version: load its model once (real dimension, fingerprint), add its storage:
    two columns on the target's table, or a table of its own (``layout``, by default
    ``EMBEDDINGS["LAYOUT"]``). With ``chunks`` (tokens per chunk; ``overlap`` tokens, default 0)
    a chunked version (``embeddings_app.chunking``): table layout, one vector per chunk. Both
    default to the alias's ``"chunks"`` and ``"chunk_overlap"``; ``chunks=0`` is whole rows."""
    field = registry.get(target)
    alias_spec = get_config().model(alias)
    if chunks is None and alias_spec.chunks:  # the alias's own settings (EMBEDDINGS["MODELS"])
        chunks = alias_spec.chunks
        overlap = alias_spec.chunk_overlap if overlap is None else overlap
    elif chunks == 0:  # whole rows, whatever the alias says
        chunks = None
    if chunks is None and overlap is not None:
        raise Refused("A chunk overlap applies to chunked versions only; give a chunk size too.",
                      option="overlap")
    if chunks is not None:
        if layout not in (None, "table"):
            raise Refused("A chunked version lives in a table of its own; add it in the table "
                          "layout.", option="layout")
        layout = "table"
    store_class = stores.store_class(layout or get_config().layout)
    check_version_name(target, version_name)
    spec, encoder, storage_type = load_new_model(alias)
    chunking_fields: dict[str, int] = {}
    if chunks is not None:
        if storage_type == "bit":
            raise Refused("A chunked version stores vector or halfvec chunks, not bits.")
        chunk_tokens, chunk_overlap = chunking.check_parameters(spec, encoder, chunks, overlap or 0)
        chunking_fields = {"chunk_tokens": chunk_tokens, "chunk_overlap": chunk_overlap}
        store_class = stores.ChunkStore
    store_class.check_new(field, version_name)
    # The probe set, embedded now (outside the transaction: an API call can be slow).
    probe_texts, probe_vectors = probes.initial(encoder, target)
    # How many rows exceed the model's token limit, while the model is loaded (status shows it).
    measured = truncation.measure(target, spec, encoder, by="add",
                                  chunked=chunking_fields.get("chunk_tokens"))
    capture.prepare(field)  # the logical capture's slot, outside the version's transaction
    with locked_versions(target) as versions:
        # Again under the lock: a concurrent `add` of the same name has committed by now.
        check_name_free(target, version_name, versions)
        store_class.check_new(field, version_name)
        version = create_version(
            target, version_name, versions, spec=spec, encoder=encoder, storage=storage_type,
            layout=store_class.layout, names=store_class.names(field, version_name),
            probe_texts=probe_texts, probe_vectors=probe_vectors, actor=actor,
            truncation=measured.as_dict(), chunk_fields=chunking_fields,
            note=f"added with {spec.model}@{spec.revision} ({store_class.layout} layout"
                 + (f", chunks of {chunks} tokens overlapping by at most {overlap or 0}"
                    if chunks is not None else "") + ")")
        version.store.add()
    return version


def check_version_name(target: str, version_name: str) -> None:
    """Refuse an invalid version name, or one the target has (had)."""
    if not VERSION_NAME.fullmatch(version_name or ""):
        raise Refused(
            f'Invalid version name "{version_name}": use a lowercase letter then up to 30 '
            "lowercase letters, digits or underscores (e.g. v2)."
        )
    if EmbeddingVersion.objects.filter(target=target, version=version_name).exists():
        raise _name_taken(target, version_name)


def check_name_free(target: str, version_name: str,
                    versions: dict[int, EmbeddingVersion]) -> None:
    """Under ``locked_versions``: refuse a name a concurrent step has just taken."""
    if any(v.version == version_name for v in versions.values()):
        raise _name_taken(target, version_name)


def _name_taken(target: str, version_name: str) -> Refused:
    return Refused(
        f'{target} already has a version "{version_name}" (names are never reused, even '
        "after drop); choose another name."
    )


def load_new_model(alias: str) -> tuple[ModelSpec, encoders.Encoder, str]:
    """The alias's spec, its loaded encoder and the storage type (vector or halfvec) of a new
    version of it; refused when the alias and this process disagree."""
    spec = get_config().model(alias)
    encoder = encoders.load(spec)
    if encoder.precision not in (None, spec.precision):
        # The probes stored now must be the pinned precision's (docs/devices.md).
        raise Refused(
            f'Model alias "{alias}" pins precision {spec.precision} but this process computes at '
            f"{encoder.precision} (EMBEDDINGS_PRECISION); add the version where it is unset."
        )
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
    return spec, encoder, storage_type


def create_version(target: str, version_name: str, versions: dict[int, EmbeddingVersion], *,
                   spec: ModelSpec, encoder: encoders.Encoder, storage: str, layout: str,
                   names: dict[str, str], probe_texts: list[str], probe_vectors: bytes,
                   actor: str, note: str, derived_from: EmbeddingVersion | None = None,
                   derivation: str = "", truncation: dict | None = None,
                   chunk_fields: dict[str, int] | None = None) -> EmbeddingVersion:
    """The record of a new version (state ``new``) and its first event, and the target's change
    capture (installed or brought up to date), inside ``locked_versions(target)``
    (``versions``); the caller adds its storage."""
    check_name_free(target, version_name, versions)
    try:
        version = EmbeddingVersion.objects.create(
            target=target, version=version_name, model_alias=spec.alias, model_name=spec.model,
            revision=spec.revision, fingerprint=encoder.fingerprint,
            encode_settings=spec.encode_settings(), dimensions=encoder.dimensions,
            storage=storage, layout=layout, **names, state=State.NEW,
            probe_texts=probe_texts, probe_vectors=probe_vectors,
            library_versions=encoder.library_versions(),
            derived_from=derived_from, derivation=derivation, truncation=truncation or {},
            **(chunk_fields or {}),
        )
    except IntegrityError:  # a writer that bypassed the lock: still one clear line
        raise _name_taken(target, version_name) from None
    VersionEvent.objects.create(version=version, to_state=State.NEW, actor=actor, note=note)
    # Change capture (docs/backfill.md): in place before the version is first written.
    capture.install(registry.get(target))
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


# A save commits its row before its post_save dual-write commits the vectors: on a live site a
# row can lack its new vector for a moment. Only rows still unfresh this long later count.
SETTLE_SECONDS = 1.0


def readiness(version: EmbeddingVersion, *, settle: bool = False) -> Readiness:
    """Coverage and staleness of ``version``. With ``settle``, a row missing or stale at the first
    look counts only if it still is ``SETTLE_SECONDS`` later (writes in flight are not gaps)."""
    field = registry.get(version.target)
    ((missing, stale),) = sync.unfresh_rows(field, [version])
    if settle and (missing or stale):
        time.sleep(SETTLE_SECONDS)
        ((missing_later, stale_later),) = sync.unfresh_rows(field, [version])
        persistent = (missing | stale) & (missing_later | stale_later)
        missing, stale = persistent & missing_later, persistent & stale_later
    total = field.model._base_manager.count()
    return Readiness(total - len(missing), total, len(stale))


ACTIVATABLE_STATES = (State.READY, State.STANDBY)
FORCIBLE_STATES = (State.NEW, State.BACKFILLING, State.FAILED, State.READY, State.STANDBY)


def activate(target: str, version_name: str, *, force: bool = False, percent: int = 100,
             actor: str = "") -> list[str]:
    """The atomic flip of reads to ``version_name``; with ``percent`` below 100, a gradual
    rollout instead: the (ready) version serves that share of the searches beside the active
    one (``embeddings_app.rollout``), under the same rules. Returns warnings: the problems
    ``force`` overrode."""
    percent = limits.integer("The share of searches in percent", percent, 1, 100,
                             option="percent")
    version = EmbeddingVersion.objects.get_version(target, version_name)
    _check_activatable(version, force=force)
    if percent < 100 and version.state != State.READY:
        raise Refused(f"{version} is {version.state}; a gradual rollout serves a share of the "
                      "reads from a ready version (backfilled, not yet active): activate a "
                      "standby version at once (rollback) instead.", option="percent")
    # The readiness checks read the whole table: outside the lock. The state is checked again
    # under it, and the flip refused if the version changed state meanwhile.
    warnings = []
    for message in activation_problems(version):
        if not force:
            raise VersionNotReady(message)
        warnings.append(f"Activating anyway (forced), although {message}")
    seen = version.state

    def recheck(locked: EmbeddingVersion) -> None:
        _check_activatable(locked, force=force)
        if locked.state != seen:
            raise Refused(f"{locked} changed from {seen} to {locked.state} while it was being "
                          f"checked; run activate again.")

    if percent < 100:
        _roll_out(target, version, percent, actor=actor, recheck=recheck)
    else:
        _flip(target, version, actor=actor, note="activate" + (" (forced)" if force else ""),
              recheck=recheck)
    return warnings


def _roll_out(target: str, version: EmbeddingVersion, percent: int, *, actor: str,
              recheck: Callable[[EmbeddingVersion], None]) -> None:
    """Set ``version``'s share of the reads, under the lock; another candidate's rollout ends."""
    with locked_versions(target) as versions:
        version = locked_version(target, versions, version)
        recheck(version)
        for other in versions.values():
            if other.pk != version.pk and other.rollout_percent:
                end_rollout(other, actor=actor, note=f"rollout replaced by {version}'s")
        version.rollout_percent = percent
        version.save(update_fields=["rollout_percent"])
        record_event(version, actor=actor, note=f"rollout: serves {percent}% of the searches")
        forget_snapshot(target)


def end_rollout(version: EmbeddingVersion, *, actor: str = "", note: str = "rollout ended") -> None:
    """``version`` serves no more reads beside the active one (inside the caller's locked
    transaction); it counts as deactivated now, so ``drop``'s grace period applies to it."""
    version.rollout_percent = 0
    version.deactivated_at = timezone.now()
    version.save(update_fields=["rollout_percent", "deactivated_at"])
    record_event(version, actor=actor, note=note)


def _check_activatable(version: EmbeddingVersion, *, force: bool) -> None:
    target, version_name = version.target, version.version
    if version.state == State.ACTIVE:
        raise Refused(f"{version} is already active.")
    if version.write_error:
        raise VersionNotReady(f"Cannot activate {version}: {unwritable_reason(version)}")
    allowed = FORCIBLE_STATES if force else ACTIVATABLE_STATES
    if version.state not in allowed:
        raise VersionNotReady(
            f"{version} is {version.state}; only a ready (or standby) version can be activated"
            + ("." if version.state in FORCIBLE_STATES else
               " and a retired or dropped one never (it is not kept fresh); add a new version.")
            + (f" Run `manage.py embeddings backfill {target} {version_name}` first."
               if version.state in FORCIBLE_STATES else "")
        )


def activation_problems(version: EmbeddingVersion) -> list[str]:
    """Why ``version`` may not be activated yet (each with what to do); empty when it may.

    It must be complete and fresh, verified (a passing ``verify`` of its current fingerprint, at
    most ``EMBEDDINGS["VERIFY_MAX_AGE"]`` seconds old) and indexed (a valid HNSW index); with a
    shadow gate set, measured on enough live searches (``shadow.gate_problems``); a bit
    version, its parent complete and kept fresh (``rerank_parent_problems``).
    """
    target, name = version.target, version.version
    problems = []
    ready = readiness(version, settle=True)
    if ready.problems:
        problems.append(f"{version} is not complete and fresh ({'; '.join(ready.problems)}); "
                        f"run `manage.py embeddings backfill {target} {name}` first.")
    max_age = timedelta(seconds=get_config().verify_max_age)
    if not version.verified_at or not version.verify_passed:
        problems.append(
            f"{version} has no passing verify"
            + (" (the last one failed)" if version.verified_at else "")
            + f"; run `manage.py embeddings verify {target} {name}` first."
        )
    elif version.verified_at < timezone.now() - max_age:
        problems.append(f"{version}'s last verify is older than {max_age}; run "
                        f"`manage.py embeddings verify {target} {name}` again.")
    elif version.verify_report.get("fingerprint_now") != version.fingerprint:
        problems.append(f"{version} was verified with other model files; run "
                        f"`manage.py embeddings verify {target} {name}` again.")
    if version.probe_passed is False:
        problems.append(f"{version}'s model no longer computes its probe vectors (last probe "
                        f"{version.probed_at:%Y-%m-%d %H:%M} UTC: "
                        f"{'; '.join(version.probe_report.get('problems', []))[:300]}); run "
                        f"`manage.py embeddings probe {target}` once the model is restored, "
                        "or add a new version.")
    if indexes.index_state(version) != "valid":
        problems.append(f"{version} has no valid HNSW index; run "
                        f"`manage.py embeddings index {target} {name}` first.")
    problems.extend(shadow.gate_problems(version))
    parent = version.derived_from if version.storage == "bit" else None
    if parent is not None:
        problems.extend(rerank_parent_problems(version, parent))
    return problems


# The states in which a version's vectors are complete and kept fresh: what a bit version's
# re-rank reads (a row without a parent vector drops out of the bit version's results).
COMPLETE_STATES = (State.READY, State.ACTIVE, State.STANDBY)


def rerank_parent_problems(version: EmbeddingVersion, parent: EmbeddingVersion) -> list[str]:
    """Why the bit version ``version`` may not serve yet because of ``parent``, whose exact
    distances re-rank its candidates: the parent must be complete and kept fresh (ready,
    active or standby, and written). (A bit version can be derived from a parent that is still
    backfilling: its own backfill embeds the rows the parent lacks.)"""
    target = parent.target
    if parent.state in (State.RETIRED, State.DROPPED):
        return [f"{version} re-ranks its candidates by {parent}, which is {parent.state} (not "
                "kept fresh); derive a new bit version from a written version."]
    if parent.write_error:
        return [f"{version} re-ranks its candidates by {parent}: {unwritable_reason(parent)}"]
    if parent.state not in COMPLETE_STATES:
        return [f"{version} re-ranks its candidates by {parent}, which is {parent.state} (rows "
                "without its vector would drop out of the results); finish its backfill "
                f"(`manage.py embeddings backfill {target} {parent.version}`) first."]
    return []


def rollback(target: str, *, actor: str = "") -> EmbeddingVersion:
    """Reactivate the most recently active version that was kept fresh (standby)."""
    registry.get(target)
    with locked_versions(target) as versions:
        rolling = [v for v in versions.values() if v.rollout_percent]
        if rolling:  # a gradual rollout: its candidate stops serving, the active version stays
            for candidate in rolling:
                end_rollout(candidate, actor=actor, note="rollback of the rollout")
            forget_snapshot(target)
            return next(v for v in versions.values() if v.state == State.ACTIVE)
        previous = _rollback_target(versions.values())
        if previous is None:
            raise Refused(
                f"{target} has no standby version to roll back to (a retired version is no "
                "longer kept fresh); activate a ready version instead."
            )
        _flip(target, previous, actor=actor, note="rollback")
    return previous


def unwritable_reason(version: EmbeddingVersion) -> str:
    """Why ``version`` is not kept fresh any more (its ``write_error``), as one sentence."""
    return (f"{version} has not been written since {version.write_error_at:%Y-%m-%d %H:%M:%S %Z} "
            f"({version.write_error[:300]}); restore its model and run `manage.py embeddings "
            f"backfill {version.target} {version.version}`, or retire it.")


def _rollback_target(versions: Iterable[EmbeddingVersion]) -> EmbeddingVersion | None:
    """The most recently deactivated standby version that is still written. Refused (with the
    reason) when every standby version has stopped being written."""
    candidates = [v for v in versions if v.state == State.STANDBY]
    standby = [v for v in candidates if not v.write_error]
    if candidates and not standby:
        broken = max(candidates, key=lambda v: (v.deactivated_at is not None, v.deactivated_at,
                                                v.pk))
        raise Refused(f"Cannot roll back to {broken}: {unwritable_reason(broken)}")
    return max(standby, key=lambda v: (v.deactivated_at is not None, v.deactivated_at, v.pk),
               default=None)


def _flip(target: str, version: EmbeddingVersion, *, actor: str, note: str,
          recheck: Callable[[EmbeddingVersion], None] | None = None) -> None:
    with locked_versions(target) as versions:  # concurrent steps serialize here
        version = locked_version(target, versions, version)
        if recheck is not None:
            recheck(version)
        for other in versions.values():
            if other.state == State.ACTIVE:
                transition(other, State.STANDBY, actor=actor, note=f"{note}: replaced by {version}")
        transition(version, State.ACTIVE, actor=actor, note=note)
        forget_snapshot(target)


def forget_snapshot(target: str) -> None:
    """Inside a step that changes which versions serve ``target``'s reads: this process switches
    at once; every other one within EMBEDDINGS["ACTIVE_CACHE_TTL"] of the commit. Forgetting the
    snapshot now as well is safe: one re-read before the commit still expires within the bound."""
    active.invalidate(target)
    transaction.on_commit(lambda: active.invalidate(target))


def retire(target: str, version_name: str, *, actor: str = "") -> EmbeddingVersion:
    """Stop writing a non-active version."""
    version = EmbeddingVersion.objects.get_version(target, version_name)
    with locked_versions(target) as versions:
        version = locked_version(target, versions, version)
        if version.state == State.ACTIVE:
            raise Refused(
                f"{version} is active and cannot be retired; activate another version first."
            )
        if version.state in (State.RETIRED, State.DROPPED):
            raise Refused(f"{version} is already {version.state}.")
        transition(version, State.RETIRED, actor=actor, note="retire")
    return version


def dependent_children(version: EmbeddingVersion) -> list[EmbeddingVersion]:
    """The versions that need ``version``'s vectors to search: binary-quantized versions derived
    from it (their candidates are re-ranked by its exact distance) that are not dropped."""
    return list(EmbeddingVersion.objects.filter(derived_from=version, storage="bit")
                .exclude(state=State.DROPPED).order_by("pk"))


def retire_warning(version: EmbeddingVersion) -> str | None:
    """What retiring ``version`` does to the versions re-ranked by it, or None."""
    children = dependent_children(version)
    if not children:
        return None
    names = ", ".join(f"{child} ({child.state})" for child in children)
    return (f"{names} re-ranks its search candidates by {version}'s vectors, which are no longer "
            f"written now: rows saved from now on drop out of its results. Retire and drop "
            f"{'them' if len(children) > 1 else 'it'} too, or derive a new bit version from the "
            "version you keep.")


def check_droppable(version: EmbeddingVersion, *, yes: bool = False) -> None:
    """Refuse to drop an active or non-retired version, and (unless ``yes``) one that was active
    less than ``EMBEDDINGS["DROP_GRACE_PERIOD"]`` seconds ago: a serving process may still read it,
    and it is the way back."""
    if version.state == State.ACTIVE:
        raise Refused(f"{version} is active and cannot be dropped; activate another version first.")
    if version.state == State.DROPPED:
        if version.store.exists() or _capture_left(version.target):
            return  # a drop interrupted after its state change: finishing it is allowed
        raise Refused(f"{version} is already dropped.")
    if version.state != State.RETIRED:
        raise Refused(
            f"{version} is {version.state}; only a retired version can be dropped: run "
            f"`manage.py embeddings retire {version.target} {version.version}` first."
        )
    children = dependent_children(version)
    if children:
        child = children[0]
        raise Refused(
            f"{child} ({child.state}) re-ranks its search candidates by {version}'s vectors: "
            f"retire and drop {child} first (`manage.py embeddings retire {child.target} "
            f"{child.version}`, then `drop`), then drop {version.version}.")
    refusal = version.store.drop_refusal()  # e.g. the column is a field of the user's model
    if refusal:
        raise Refused(refusal)
    grace = timedelta(seconds=get_config().drop_grace_period)
    if not yes and version.deactivated_at and version.deactivated_at > timezone.now() - grace:
        raise Refused(
            f"{version} was active until {version.deactivated_at:%Y-%m-%d %H:%M:%S %Z}, less "
            f"than the grace period ({grace}) ago; confirm the drop to drop it anyway.",
            option="yes")


def dropped_meanwhile(exc: BaseException) -> Refused | None:
    """The refusal for a step that stopped because a concurrent ``drop`` removed the columns it
    was reading (PostgreSQL's undefined column or table, 42703 / 42P01): the lock serializes
    state changes, not the long reads of ``activate``, ``verify``, ``index`` or ``status``.
    None for any other error."""
    cause = exc.__cause__ if not isinstance(exc, psycopg.Error) else exc
    if not isinstance(cause, (psycopg.errors.UndefinedColumn, psycopg.errors.UndefinedTable)):
        return None
    first = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    return Refused(f"A version's columns were dropped while this step read them ({first}); the "
                   "step stopped. See `manage.py embeddings status`.")


def drop(target: str, version_name: str, *, actor: str = "", yes: bool = False) -> list[str]:
    """Drop a retired version's indexes and storage (its columns, or its table); the version row
    stays as history. ``yes`` confirms a drop within the grace period after the version was last
    active.

    The version becomes ``dropped`` (committed, under the lifecycle lock) before its storage is
    removed: from then on nothing reads or writes it. If the removal is interrupted, ``drop``
    again finishes it."""
    version = EmbeddingVersion.objects.get_version(target, version_name)
    field = registry.get(target)
    check_droppable(version, yes=yes)
    if connection.in_atomic_block:
        raise Refused("drop cannot run inside a transaction (it drops indexes concurrently).")
    with locked_versions(target) as versions:
        version = locked_version(target, versions, version)
        check_droppable(version, yes=yes)  # again, on the locked row
        if version.state != State.DROPPED:
            transition(version, State.DROPPED, actor=actor, note="drop")
    active.invalidate(target)
    store = stores.store_for(version, field)
    dropped_indexes = store.drop()
    _remove_capture_after_last(target, field)
    event = version.events.filter(to_state=State.DROPPED).order_by("-at", "-id").first()
    if event is not None:
        VersionEvent.objects.filter(pk=event.pk).update(
            note=f"drop: {store.describe_storage()} and indexes "
                 + (", ".join(dropped_indexes) or "(none)"))
    return dropped_indexes


def install_capture(target: str) -> None:
    """Install (or bring up to date with the declared source columns) the target's change
    capture: for versions added before it existed, or after the source fields changed."""
    field = registry.get(target)
    reason = capture.uncapturable_reason(field)
    if reason is not None:
        raise Refused(f"{target} cannot be captured: {reason}; its sweep reads every row (call "
                      f"{field.model.__name__}.{field.name}.sync(queryset) after bulk writes).")
    if not get_config().change_capture:
        raise Refused('EMBEDDINGS["CHANGE_CAPTURE"] is False; set it to True (the default) or '
                      '"logical" to capture writes.')
    capture.prepare(field)  # the logical capture's slot: outside any transaction
    with locked_versions(target):
        capture.install(field)


def remove_capture(target: str) -> None:
    """Remove the target's change capture (its sweep then reads every row)."""
    field = registry.get(target)
    with locked_versions(target):
        capture.remove(field)


def _capture_left(target: str) -> bool:
    """Is the target's change capture still installed although every version is dropped (a
    ``drop`` of the last one interrupted before it removed it)?"""
    field = registry.get(target)
    return (capture.queue_stats(field) is not None
            and not EmbeddingVersion.objects.for_target(target).exclude(
                state=State.DROPPED).exists())


def _remove_capture_after_last(target: str, field: VersionedEmbedding) -> None:
    """The last version dropped removes the target's change capture: under the lifecycle lock,
    so a concurrent ``add`` (which installs it) serializes with it."""
    if not capture.capturable(field):
        return  # never installed
    with locked_versions(target) as versions:
        if all(v.state == State.DROPPED for v in versions.values()):
            capture.remove(field)


def verify(target: str, version_name: str, *, sample: int | None = None,
           threshold: float | None = None, model: str | None = None,
           actor: str = "") -> VerifyReport:
    """Run ``verify`` (see ``embeddings_app.verify``) and record the result on the version
    (``verified_at``, ``verify_passed``, ``verify_report``) unless ``model`` names another alias.
    Drift does not raise: check ``report.passed``."""
    version = EmbeddingVersion.objects.get_version(target, version_name)
    report = run_verify(version, sample=sample, threshold=threshold, alias=model)
    if model is None or model == version.model_alias:
        probe_fields = {}
        if report.probe.get("recorded"):
            probe_fields = {"probed_at": timezone.now(),
                            "probe_passed": bool(report.probe.get("passed")),
                            "probe_report": report.probe}
        if report.truncation:  # measured with the version's own model: its figure now
            probe_fields["truncation"] = report.truncation
        EmbeddingVersion.objects.filter(pk=version.pk).update(
            verified_at=timezone.now(), verify_passed=report.passed,
            verify_report=report.as_dict(), **probe_fields,
        )
        VersionEvent.objects.create(
            version=version, from_state=version.state, to_state=version.state, actor=actor,
            note=("verify passed" if report.passed else "verify failed: "
                  + "; ".join(report.problems))[:2000],
        )
    return report


def build_index(target: str, version_name: str, *, m: int | None = None,
                ef_construction: int | None = None, ef_search: int | None = None,
                progress: Callable[[Progress], None] | None = None,
                maintenance_work_mem: str | int | None = None,
                parallel_workers: int | None = None,
                on_plan: Callable[[BuildPlan], None] | None = None) -> str:
    """Build (or rebuild, if INVALID or built with other parameters) the version's HNSW index
    concurrently; ``ef_search`` sets the version's ``hnsw.ef_search`` for its searches. The
    build's session settings and memory estimate: ``indexes.plan`` (``on_plan`` sees it)."""
    version = EmbeddingVersion.objects.get_version(target, version_name)
    if ef_search is not None:
        limits.integer("HNSW ef_search", ef_search, *limits.HNSW_EF_SEARCH)
    # Every number is checked before anything is stored.
    limits.hnsw(version.hnsw_m if m is None else m,
                version.hnsw_ef_construction if ef_construction is None else ef_construction)
    if maintenance_work_mem is not None:
        limits.memory_kb("The build's maintenance_work_mem", maintenance_work_mem,
                         "maintenance_work_mem")
    if parallel_workers is not None:
        limits.integer("The build's parallel workers", parallel_workers,
                       *limits.PARALLEL_MAINTENANCE_WORKERS, "parallel_workers")
    if ef_search is not None:
        version.hnsw_ef_search = ef_search
        version.save(update_fields=["hnsw_ef_search"])
        active.invalidate(target)
    return indexes.build(version, m=m, ef_construction=ef_construction, progress=progress,
                         maintenance_work_mem=maintenance_work_mem,
                         parallel_workers=parallel_workers, on_plan=on_plan)
