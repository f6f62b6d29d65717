"""Every error the app raises is an ``EmbeddingError``; messages are one line saying why and what
to do, so commands and the admin can show them as they are.

A message names no command-line flag (the admin and the Python API show it too). An error about
one argument of the call, or one that an argument would waive, names it in ``option`` (the
keyword argument: ``"batch_size"``, ``"yes"``); the management command adds its own flag for it
(``--batch-size``, ``--yes``) when it prints the error."""


class EmbeddingError(Exception):
    """Base class of every error raised by embeddings_app."""

    def __init__(self, *args: object, option: str | None = None) -> None:
        super().__init__(*args)
        self.option = option


class ConfigurationError(EmbeddingError):
    """The EMBEDDINGS setting or a VersionedEmbedding declaration is invalid."""


class UnknownTarget(EmbeddingError):
    """No VersionedEmbedding is registered under that app_label.Model.field name."""


class UnknownVersion(EmbeddingError):
    """The target has no version of that name."""


class Refused(EmbeddingError):
    """A lifecycle step was refused; nothing was changed."""


class VersionNotReady(Refused):
    """The version is not in a state that allows the requested step."""


class VersionMismatch(EmbeddingError):
    """A vector or query does not belong to the version it would be searched against."""


class FingerprintMismatch(EmbeddingError):
    """The model files or encode settings differ from those pinned when the version was added."""


class ModelLoadError(EmbeddingError):
    """The pinned model could not be found or loaded offline."""


class ProviderError(EmbeddingError):
    """The embedding provider failed a request as a whole (a bad key, an unknown model, an
    outage): no row is to blame, so none is marked failed."""


class ProviderUnavailable(ProviderError):
    """A transient provider failure (429, 5xx, a timeout, a dropped connection) that outlasted
    the retries: a backfill batch is retried later; a search reports it. Never a fallback."""


class ProbeMismatch(EmbeddingError):
    """The model no longer computes the probe vectors stored when the version was added."""


class DeviceError(ConfigurationError):
    """This process's device options (``EMBEDDINGS_DEVICE``, ``EMBEDDINGS_PRECISION``,
    ``EMBEDDINGS_ENCODE_BATCH_SIZE``) name an unknown or unavailable device or value."""


class DeviceUnavailable(ProviderUnavailable):
    """The device failed a whole encode (out of memory even one text at a time, a lost GPU): a
    backfill batch is retried later, no row is marked failed, nothing is written."""


class PrecisionMismatch(EmbeddingError):
    """This process computes at another precision than the version pins (and the alias does not
    accept that precision for it): its vectors are refused, never written."""
