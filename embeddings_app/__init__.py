"""Zero-downtime embedding model migrations for Django on PostgreSQL + pgvector.

The public API: ``VersionedEmbedding`` (declared on a model) and the exceptions every step
raises, all ``EmbeddingError``s. Everything else is reached through ``manage.py embeddings``,
the admin, or the modules named in the docs.

Django imports this package while it reads ``INSTALLED_APPS``, before any model can be defined,
so ``VersionedEmbedding`` (whose module imports the app's models) is imported on first access
(a module ``__getattr__``), not here; the exceptions import nothing and are here at once.
"""

from typing import TYPE_CHECKING, Any

from .exceptions import (
    ConfigurationError,
    DeviceError,
    DeviceUnavailable,
    EmbeddingError,
    FingerprintMismatch,
    ModelLoadError,
    PrecisionMismatch,
    ProbeMismatch,
    ProviderError,
    ProviderUnavailable,
    Refused,
    UnknownTarget,
    UnknownVersion,
    VersionMismatch,
    VersionNotReady,
)

if TYPE_CHECKING:
    from .fields import VersionedEmbedding

__version__ = "0.1.0"

__all__ = [
    "ConfigurationError",
    "DeviceError",
    "DeviceUnavailable",
    "EmbeddingError",
    "FingerprintMismatch",
    "ModelLoadError",
    "PrecisionMismatch",
    "ProbeMismatch",
    "ProviderError",
    "ProviderUnavailable",
    "Refused",
    "UnknownTarget",
    "UnknownVersion",
    "VersionMismatch",
    "VersionNotReady",
    "VersionedEmbedding",
]


def __getattr__(name: str) -> Any:
    if name == "VersionedEmbedding":
        # Load-bearing lazy import: ``fields`` imports the app's models, which cannot be imported
        # while Django is still reading INSTALLED_APPS (AppRegistryNotReady), when this runs first.
        from .fields import VersionedEmbedding

        return VersionedEmbedding
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
