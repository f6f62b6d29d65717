"""The records of every embedding version, its state changes and its backfill runs."""

from __future__ import annotations

from datetime import datetime

from django.db import models
from django.db.models import F, Q
from django.utils import timezone

from .exceptions import UnknownVersion, VersionNotReady
from .stores import LAYOUTS, VersionStore, store_for


class State(models.TextChoices):
    NEW = "new", "new"  # column added, nothing embedded yet
    BACKFILLING = "backfilling", "backfilling"
    READY = "ready", "ready"  # complete and fresh, can be activated
    ACTIVE = "active", "active"  # serves reads; exactly one per target
    STANDBY = "standby", "standby"  # was active, still dual-written: the rollback target
    RETIRED = "retired", "retired"  # no longer written
    DROPPED = "dropped", "dropped"  # its column or table and index gone; the row stays as history
    FAILED = "failed", "failed"  # a backfill gave up; can be resumed


# Versions whose vectors are kept up to date on every save.
WRITTEN_STATES = (State.BACKFILLING, State.READY, State.ACTIVE, State.STANDBY)
# Versions whose storage (column or table) exists.
STORED_STATES = tuple(state for state in State if state != State.DROPPED)


class EmbeddingVersionQuerySet(models.QuerySet["EmbeddingVersion"]):
    def for_target(self, target: str) -> EmbeddingVersionQuerySet:
        return self.filter(target=target)

    def written(self) -> EmbeddingVersionQuerySet:
        return self.filter(state__in=WRITTEN_STATES)

    def get_version(self, target: str, version: str) -> EmbeddingVersion:
        try:
            return self.get(target=target, version=version)
        except EmbeddingVersion.DoesNotExist:
            known = ", ".join(self.for_target(target).values_list("version", flat=True)) or "none"
            raise UnknownVersion(
                f'{target} has no version "{version}" (versions: {known}); '
                f"see `manage.py embeddings status {target}`."
            ) from None

    def active_for(self, target: str) -> EmbeddingVersion:
        version = self.filter(target=target, state=State.ACTIVE).first()
        if version is None:
            raise VersionNotReady(
                f"{target} has no active version; add, backfill and activate one "
                "(the `embeddings migrate` command does all three)."
            )
        return version


class EmbeddingVersion(models.Model):
    """One model version of one embedded field, stored in its own column or table (``layout``;
    ``store`` is the only code that knows where its vectors live)."""

    target = models.CharField(max_length=200, help_text="app_label.Model.field")
    version = models.CharField(max_length=31)
    model_alias = models.CharField(max_length=100)
    model_name = models.CharField(max_length=500, help_text="hub id or local directory")
    revision = models.CharField(max_length=200)
    fingerprint = models.CharField(max_length=64)
    encode_settings = models.JSONField(default=dict)
    dimensions = models.PositiveIntegerField()
    storage = models.CharField(max_length=10, default="vector")
    distance = models.CharField(max_length=10, default="cosine")
    # "column": two columns on the user's table (column, hash_column); "table": a table of its
    # own (table), with columns named column and hash_column. Versions from before layouts
    # existed are column versions: no data migration.
    layout = models.CharField(max_length=10, default="column",
                              choices=[(layout, layout) for layout in LAYOUTS])
    column = models.CharField(max_length=63)
    hash_column = models.CharField(max_length=63)
    table = models.CharField(max_length=63, blank=True, default="",
                             help_text="the version's own table (table layout)")
    state = models.CharField(max_length=20, choices=State.choices, default=State.NEW)
    # A chunked version (embeddings_app.chunking; table layout only): each row's text is cut into
    # chunks of at most ``chunk_tokens`` of the model's tokens, overlapping by at most
    # ``chunk_overlap``, one vector per chunk. None: one vector per row (a whole-row version).
    chunk_tokens = models.PositiveIntegerField(null=True, blank=True)
    chunk_overlap = models.PositiveIntegerField(default=0)
    # Lineage (``embeddings derive``): the version this one was computed from, and how
    # ("first 256 dimensions", "halfvec", "bit"). A "bit" version re-ranks its candidates by the
    # parent's vectors, so the parent is kept (``lifecycle.dependent_children``).
    derived_from = models.ForeignKey("self", on_delete=models.SET_NULL, null=True, blank=True,
                                     related_name="derived_versions")
    derivation = models.CharField(max_length=100, blank=True, default="")

    created_at = models.DateTimeField(default=timezone.now)
    state_changed_at = models.DateTimeField(default=timezone.now)
    activated_at = models.DateTimeField(null=True, blank=True)
    deactivated_at = models.DateTimeField(null=True, blank=True)

    # Cutover: the last verify (when, verdict, figures) and the HNSW parameters of this version.
    verified_at = models.DateTimeField(null=True, blank=True)
    verify_passed = models.BooleanField(null=True, blank=True)
    verify_report = models.JSONField(default=dict, blank=True)
    hnsw_m = models.PositiveIntegerField(default=16)
    hnsw_ef_construction = models.PositiveIntegerField(default=64)
    hnsw_ef_search = models.PositiveIntegerField(default=40)
    # Set when a save could not write this (non-active) version because its model failed to
    # load: it is left out of writes and is no rollback target until a backfill clears it.
    write_error = models.TextField(blank=True)
    write_error_at = models.DateTimeField(null=True, blank=True)

    # Probes (embeddings_app.probes): fixed texts embedded at `add`, float32 vectors row-major,
    # re-embedded by verify, check --deploy and `probe` to catch a model that changed under its
    # name; the libraries that computed them (local models); the last comparison.
    probe_texts = models.JSONField(default=list, blank=True)
    probe_vectors = models.BinaryField(null=True, blank=True, editable=False)
    library_versions = models.JSONField(default=dict, blank=True)
    probed_at = models.DateTimeField(null=True, blank=True)
    probe_passed = models.BooleanField(null=True, blank=True)
    probe_report = models.JSONField(default=dict, blank=True)
    # Truncation (embeddings_app.truncation): the last count of sampled rows longer than the
    # model's token limit, measured by add, verify and compare (which load the model anyway) so
    # that status and the admin read it without tokenizing; {} until first measured.
    truncation = models.JSONField(default=dict, blank=True)
    # Shadow reads (embeddings_app.shadow): the share of live searches of the target that this
    # (non-active) version also answers off the request path; 0 is off. At most one version of
    # a target is shadowed; activate, rollback, retire and drop turn it off.
    shadow_rate = models.FloatField(default=0.0)
    # A gradual rollout (``activate --percent``, embeddings_app.rollout): the share of the
    # target's searches, in percent, this ready version serves beside the active one; 0 is none.
    # The database keeps at most one such candidate per target, below 100 (100 is the flip).
    rollout_percent = models.PositiveSmallIntegerField(default=0)

    objects = EmbeddingVersionQuerySet.as_manager()

    class Meta:
        ordering = ["target", "created_at", "id"]
        permissions = [
            ("run_backfill", "Can start backfills, index builds and verifications"),
            ("switch_active", "Can activate, roll back and retire versions"),
            ("drop_version", "Can drop a retired version's column"),
        ]
        constraints = [
            models.UniqueConstraint(fields=["target", "version"], name="embeddings_unique_version"),
            # The database, not the app, guarantees that reads have exactly one version to use.
            models.UniqueConstraint(
                fields=["target"], condition=Q(state="active"), name="embeddings_one_active"
            ),
            # At most one version serves a share of the reads beside the active one.
            models.UniqueConstraint(
                fields=["target"], condition=Q(rollout_percent__gt=0),
                name="embeddings_one_rollout_candidate"
            ),
            models.CheckConstraint(
                condition=Q(rollout_percent__lt=100) & (Q(rollout_percent=0) | Q(state="ready")),
                name="embeddings_rollout_of_a_ready_version_below_100"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.target}@{self.version}"

    @property
    def is_written(self) -> bool:
        return self.state in WRITTEN_STATES

    @property
    def store(self) -> VersionStore:
        """Where this version's vectors live (``embeddings_app.stores``)."""
        return store_for(self)

    @property
    def layout_label(self) -> str:
        """``column`` or ``table``; a chunked version (a table): ``chunks:TOKENS`` and
        ``/OVERLAP`` if any."""
        if not self.chunk_tokens:
            return self.layout
        return f"chunks:{self.chunk_tokens}" + (f"/{self.chunk_overlap}" if self.chunk_overlap
                                                 else "")

    @property
    def lineage(self) -> str:
        """``v3 <- v1 (bit)`` for a derived version, else ``""``."""
        if self.derived_from_id is None:
            return ""
        return f"{self.version} <- {self.derived_from.version} ({self.derivation})"

    @property
    def model_label(self) -> str:
        """``name@revision``; a local folder is named by its last two path parts."""
        name = self.model_name
        if name.startswith("/"):
            name = "/".join(name.rstrip("/").split("/")[-2:])
        return f"{name}@{self.revision[:12]}"


class VersionEvent(models.Model):
    """A state change of a version: who, when, from what to what."""

    version = models.ForeignKey(EmbeddingVersion, on_delete=models.CASCADE, related_name="events")
    from_state = models.CharField(max_length=20, blank=True)
    to_state = models.CharField(max_length=20)
    actor = models.CharField(max_length=150, blank=True)
    note = models.TextField(blank=True)
    at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["at", "id"]

    def __str__(self) -> str:
        return f"{self.version}: {self.from_state or '-'} -> {self.to_state}"


class BackfillRun(models.Model):
    """Progress of one backfill of one version, updated by its batches as they finish."""

    class Status(models.TextChoices):
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"

    version = models.ForeignKey(EmbeddingVersion, on_delete=models.CASCADE, related_name="runs")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.RUNNING)
    mode = models.CharField(max_length=10, default="celery")  # "celery" | "inline"
    batch_size = models.PositiveIntegerField()
    batches_total = models.PositiveIntegerField(default=0)
    batches_done = models.PositiveIntegerField(default=0)
    rows_total = models.PositiveBigIntegerField(default=0)
    rows_processed = models.PositiveBigIntegerField(default=0)  # read and checked
    rows_embedded = models.PositiveBigIntegerField(default=0)  # encoded and written
    rows_skipped = models.PositiveBigIntegerField(default=0)  # empty source: no vector
    rows_conflicted = models.PositiveBigIntegerField(default=0)  # changed under the batch
    rows_failed = models.PositiveBigIntegerField(default=0)
    last_error = models.TextField(blank=True)
    started_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)
    # [[unix_seconds, rows_processed], ...]: appended by a database trigger (migration 0003) at
    # most once a second while the run progresses, for the admin's coverage-over-time chart.
    progress_samples = models.JSONField(default=list, blank=True, editable=False)

    class Meta:
        ordering = ["-started_at", "-id"]

    def __str__(self) -> str:
        return f"backfill of {self.version} ({self.status})"

    @property
    def rate(self) -> float | None:
        """Rows processed per second so far."""
        end = self.finished_at or timezone.now()
        seconds = (end - self.started_at).total_seconds()
        return self.rows_processed / seconds if seconds > 0 and self.rows_processed else None

    @property
    def eta_seconds(self) -> float | None:
        rate = self.rate
        if self.status != self.Status.RUNNING or not rate:
            return None
        return max(self.rows_total - self.rows_processed, 0) / rate


class RowFailure(models.Model):
    """A row a backfill could not embed: its key and the error, for the admin and `status`."""

    version = models.ForeignKey(EmbeddingVersion, on_delete=models.CASCADE, related_name="failures")
    run = models.ForeignKey(BackfillRun, on_delete=models.SET_NULL, null=True, blank=True,
                            related_name="failures")
    row_key = models.CharField(max_length=200)
    error = models.TextField()
    at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-at", "-id"]
        indexes = [models.Index(fields=["version", "row_key"])]

    def __str__(self) -> str:
        return f"{self.version} row {self.row_key}: {self.error[:60]}"


class BackfillBatch(models.Model):
    """One primary-key range of a backfill run: the unit a worker takes, retries and finishes.

    A batch is counted into its run exactly once (``pending``/``running`` -> ``done``/``failed``),
    however often the broker redelivers it, so the run's totals stay consistent with the table.
    """

    class Status(models.TextChoices):
        PENDING = "pending"
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"

    run = models.ForeignKey(BackfillRun, on_delete=models.CASCADE, related_name="batches")
    number = models.PositiveIntegerField()
    low = models.JSONField(null=True, blank=True)  # primary key bounds [low, high); None = open
    high = models.JSONField(null=True, blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    worker = models.CharField(max_length=200, blank=True)  # host:pid of the last attempt
    rows_processed = models.PositiveIntegerField(default=0)
    rows_embedded = models.PositiveIntegerField(default=0)
    rows_skipped = models.PositiveIntegerField(default=0)
    rows_conflicted = models.PositiveIntegerField(default=0)
    rows_failed = models.PositiveIntegerField(default=0)
    # The transactions (PostgreSQL xids, as text) that wrote the batch's rows: a row whose
    # current version (xmin) is one of them has not changed since, so the run's catch-up pass
    # need not read it. Nullable: code from before this column keeps inserting batches while a
    # rolling deploy is under way (NULL reads as "unknown": those rows are read).
    write_xids = models.JSONField(null=True, blank=True, default=list)
    error = models.TextField(blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # The lease of the running attempt: renewed by its worker while it runs; once it has expired
    # (the worker died) the batch is reclaimed (set pending again and re-dispatched).
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    reclaims = models.PositiveIntegerField(default=0)
    reclaimed_at = models.DateTimeField(null=True, blank=True)
    reclaim_note = models.TextField(blank=True)  # whose lease expired when, and the re-dispatch

    class Meta:
        ordering = ["run", "number"]
        constraints = [
            models.UniqueConstraint(fields=["run", "number"], name="embeddings_unique_batch"),
        ]

    def __str__(self) -> str:
        return f"batch {self.number} of run {self.run_id} ({self.status})"


class ProviderUsage(models.Model):
    """A request sent to an embedding API: the shared rate limiter's log (``ratelimit``)."""

    key = models.CharField(max_length=64)  # endpoint and model, hashed
    at = models.FloatField()  # admitted, the database clock in epoch seconds
    done = models.FloatField(null=True)  # when its answer came back (None: in flight)
    tokens = models.PositiveIntegerField()

    class Meta:
        indexes = [models.Index(fields=["key", "at"], name="embeddings_usage_key_at")]


class ProviderPause(models.Model):
    """Until when every process waits before its next request to an API (a 429's Retry-After)."""

    key = models.CharField(max_length=64, unique=True)
    until = models.FloatField()


class ShadowBucket(models.Model):
    """The shadow reads of one candidate version in one hour (embeddings_app.shadow): sums from
    which the means are read, never a query's text. Bounded: ``shadow.KEEP_HOURS`` per version."""

    version = models.ForeignKey(EmbeddingVersion, on_delete=models.CASCADE,
                                related_name="shadow_buckets")
    hour = models.DateTimeField()
    queries = models.PositiveIntegerField(default=0)
    # overlap@k of the candidate's top k with the served top k, summed over the queries.
    overlap_sum = models.FloatField(default=0.0)
    # Spearman's rank correlation over the rows both ranked (queries with two or more of them).
    rank_sum = models.FloatField(default=0.0)
    rank_queries = models.PositiveIntegerField(default=0)
    served_seconds = models.FloatField(default=0.0)
    candidate_seconds = models.FloatField(default=0.0)
    # Served rows the candidate could not rank: no vector of its own, or one of an older text.
    unranked_rows = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["version", "hour"]
        constraints = [models.UniqueConstraint(fields=["version", "hour"],
                                               name="embeddings_one_shadow_bucket_per_hour")]

    def __str__(self) -> str:
        return f"{self.version} shadow reads at {self.hour:%Y-%m-%d %H:00}"


class ServedReads(models.Model):
    """The searches one version served in one hour, and their time (embeddings_app.rollout):
    each serving process adds its counts at most every ``rollout.FLUSH_SECONDS``."""

    version = models.ForeignKey(EmbeddingVersion, on_delete=models.CASCADE,
                                related_name="served_reads")
    hour = models.DateTimeField()
    reads = models.PositiveBigIntegerField(default=0)
    seconds = models.FloatField(default=0.0)

    class Meta:
        ordering = ["version", "hour"]
        constraints = [models.UniqueConstraint(fields=["version", "hour"],
                                               name="embeddings_one_served_reads_per_hour")]

    def __str__(self) -> str:
        return f"{self.version} reads at {self.hour:%Y-%m-%d %H:00}"


def current_hour() -> datetime:
    return timezone.now().replace(minute=0, second=0, microsecond=0)


def add_to_hour(model: type[ShadowBucket] | type[ServedReads], version_id: int, hour: datetime,
                **amounts: float) -> bool:
    """Add ``amounts`` to the columns of ``version_id``'s row of ``hour`` in an hourly table
    (``ShadowBucket``, ``ServedReads``), in one UPDATE, so concurrent writers never lose a
    count; True when this call created the row."""
    row, created = model.objects.get_or_create(version_id=version_id, hour=hour)
    model.objects.filter(pk=row.pk).update(**{name: F(name) + amount
                                              for name, amount in amounts.items()})
    return created
