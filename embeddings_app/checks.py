"""Django system checks: a bad EMBEDDINGS setting is reported by `manage.py check`."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks
from django.db import DatabaseError

from . import capture, config, devices, probes, registry, stores
from .encoders import fingerprint, resolve_model_path
from .exceptions import DeviceError, EmbeddingError
from .lifecycle import unwritable_reason
from .models import WRITTEN_STATES, EmbeddingVersion, State
from .stores import ColumnStore


@checks.register("embeddings")
def check_embeddings_setting(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    raw = getattr(settings, "EMBEDDINGS", None)
    return [
        checks.Error(problem.message, hint=problem.hint, id=problem.id)
        for problem in config.validate(raw)
    ]


@checks.register("embeddings")
def check_process_devices(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """This process's ``EMBEDDINGS_DEVICE`` / ``EMBEDDINGS_PRECISION`` /
    ``EMBEDDINGS_ENCODE_BATCH_SIZE`` (its environment, not the settings): run ``manage.py check``
    with a worker's environment to check that worker's options (docs/devices.md)."""
    try:
        devices.current()
    except DeviceError as exc:
        return [checks.Error(str(exc), hint="These are per-process environment variables; fix "
                             "them where this process (a worker) is started.",
                             id="embeddings.E033")]
    return []


@checks.register("embeddings", deploy=True)
def check_active_fingerprints(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """``manage.py check --deploy``: the model behind every active version still matches the
    fingerprint pinned when the version was added (a changed file would silently change the
    query vectors, which would then be searched against vectors of the old model), and still
    computes the version's probe vectors (an API or a library may change under the name)."""
    if config.validate(getattr(settings, "EMBEDDINGS", None)):
        return []  # reported by check_embeddings_setting
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
            if spec.is_api:
                from .api import api_fingerprint  # lazy: the SDK only where an API is used

                current = api_fingerprint(spec)
            else:
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
            continue
        report = probes.run(version)  # an API's model can change behind an unchanged identity
        if not report.passed:
            messages.append(checks.Error(
                f"Active version {version} (alias \"{version.model_alias}\"): "
                + "; ".join(report.problems) + ".",
                hint="Searches would embed queries with another model than the stored vectors. "
                "Pin the provider or libraries back, or add a new version and migrate to it.",
                id="embeddings.E103",
            ))
    return messages


@checks.register("embeddings", deploy=True)
def check_unwritten_versions(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """``manage.py check --deploy``: a standby (or other written, non-active) version that saves
    could not write (its model failed to load) is stale and no rollback target."""
    if config.validate(getattr(settings, "EMBEDDINGS", None)):
        return []
    try:
        broken = list(EmbeddingVersion.objects.filter(state__in=WRITTEN_STATES)
                      .exclude(write_error=""))
    except DatabaseError:
        return []  # reported by check_active_fingerprints
    return [checks.Warning(
        unwritable_reason(version),
        hint="Until then rollback refuses it and saves leave it out.",
        id="embeddings.W110",
    ) for version in broken]


@checks.register("embeddings", deploy=True)
def check_change_capture(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """``manage.py check --deploy``: a target with written versions whose writes the database
    cannot capture (a callable source: W120), or whose capture is not installed (versions added
    before change capture existed, or with it off: W121), is kept fresh behind the app's back
    only by full scans of its table."""
    if config.validate(getattr(settings, "EMBEDDINGS", None)):
        return []
    try:
        written = set(EmbeddingVersion.objects.filter(state__in=WRITTEN_STATES)
                      .values_list("target", flat=True).distinct())
        messages: list[checks.CheckMessage] = []
        for target in sorted(written & set(registry.all_targets())):
            field = registry.get(target)
            reason = capture.uncapturable_reason(field)
            if reason is not None:
                messages.append(checks.Warning(
                    f"{target}: writes that bypass save signals cannot be captured ({reason}); "
                    "its sweep reads every row of the table.",
                    hint=f"After bulk writes (bulk_update, QuerySet.update(), raw SQL) call "
                    f"{field.model.__name__}.{field.name}.sync(queryset), or declare the source "
                    "as a list of columns.",
                    id="embeddings.W120"))
            elif config.get_config().change_capture and not capture.installed(field):
                how = ("is installed another way than EMBEDDINGS[\"CHANGE_CAPTURE\"] asks"
                       if capture.queue_stats(field) is not None else "is not installed")
                messages.append(checks.Warning(
                    f"{target}: its change capture {how}; its sweep reads every row of the "
                    "table.",
                    hint=f"Run `manage.py embeddings capture {target}`.",
                    id="embeddings.W121"))
        if config.get_config().capture_mode == "logical":
            messages.extend(_logical_capture_problems())
    except DatabaseError:
        return []  # reported by check_active_fingerprints
    return messages


# A slot that holds more write-ahead log than this is warned about (``embeddings.W123``).
SLOT_BACKLOG_WARNING = 1 << 30


def _logical_capture_problems() -> list[checks.CheckMessage]:
    """The logical capture's server-side needs: ``wal_level = logical`` (W122), and a slot that
    is read (W123: a slot nobody reads keeps the write-ahead log, and the disk fills)."""
    slot = stores.CaptureSlot()
    level = slot.wal_level()
    if level != "logical":
        return [checks.Warning(
            f'EMBEDDINGS["CHANGE_CAPTURE"] is "logical" but the server runs wal_level = {level}: '
            "no write can be captured and `add` refuses.",
            hint="Set wal_level = logical (a restart), or CHANGE_CAPTURE = True for the trigger.",
            id="embeddings.W122")]
    backlog = slot.backlog()
    if backlog is not None and backlog > SLOT_BACKLOG_WARNING:
        return [checks.Warning(
            f"The logical capture's slot {slot.name} holds {capture.size_label(backlog)} of "
            "write-ahead log: the server keeps it until a drain reads it.",
            hint="Schedule embeddings_app.drain (docs/backfill.md, \"The lag bound\"); "
                 "max_slot_wal_keep_size bounds what a forgotten slot can hold.",
            id="embeddings.W123")]
    return []


@checks.register("embeddings", deploy=True)
def check_adopted_model_fields(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """``manage.py check --deploy``: a written version whose vectors are a field of the user's
    model (an adopted ``VectorField``, docs/cutover.md, "Adopting existing vectors"). Django's
    ``save()`` writes that field too, with the value loaded into the instance: an instance loaded
    before a backfill or ``sync`` re-embedded its row writes the older vector back under a current
    source hash."""
    if config.validate(getattr(settings, "EMBEDDINGS", None)):
        return []
    try:
        written = list(EmbeddingVersion.objects.filter(state__in=WRITTEN_STATES, layout="column"))
    except DatabaseError:
        return []  # reported by check_active_fingerprints
    messages: list[checks.CheckMessage] = []
    for version in written:
        try:
            store = version.store
        except EmbeddingError:
            continue  # an undeclared target: not this check's business
        model_field = store.model_field() if isinstance(store, ColumnStore) else None
        if model_field is not None:
            messages.append(checks.Warning(
                f"{version} stores its vectors in the field "
                f"{model_field.model._meta.label}.{model_field.name} of your model: save() "
                "writes it with the value loaded into the instance.",
                hint="Save with update_fields (leaving the field out) where an instance may be "
                "older than a backfill or sync of its row, and stop your own code writing it; "
                "or migrate to a version the app owns and remove the field "
                '(docs/cutover.md, "Adopting existing vectors").',
                id="embeddings.W130",
            ))
    return messages
