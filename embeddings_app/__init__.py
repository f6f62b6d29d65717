"""Zero-downtime embedding model migrations for Django on PostgreSQL + pgvector."""

__version__ = "0.1.0"
