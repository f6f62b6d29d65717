"""The demo content: news articles searched semantically, and support tickets."""

from __future__ import annotations

import uuid

from django.db import models

from embeddings_app import VersionedEmbedding


class Article(models.Model):
    title = models.CharField(max_length=300)
    body = models.TextField()
    category = models.CharField(max_length=40, blank=True)

    embedding = VersionedEmbedding(source=["title", "body"])

    def __str__(self) -> str:
        return self.title


def ticket_text(ticket: Ticket) -> str | None:
    """A ticket is embedded from its subject and its raw e-mail body, decoded as UTF-8 with
    ``surrogateescape`` (bytes that are not UTF-8 become lone surrogates, as the e-mail module
    does); no subject and no body -> None (nothing to embed)."""
    body = None if ticket.raw_body is None else bytes(ticket.raw_body).decode(
        "utf-8", "surrogateescape")
    parts = [part for part in (ticket.subject, body) if part]
    return "\n\n".join(parts) if parts else None


class Ticket(models.Model):
    """Support tickets: a UUID primary key and a callable embedding source."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    subject = models.CharField(max_length=300, blank=True)
    raw_body = models.BinaryField(null=True, blank=True)

    embedding = VersionedEmbedding(source=ticket_text)

    def __str__(self) -> str:
        return self.subject or str(self.id)
