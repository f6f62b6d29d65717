"""The demo content: news articles searched semantically."""

from django.db import models

from embeddings_app.fields import VersionedEmbedding


class Article(models.Model):
    title = models.CharField(max_length=300)
    body = models.TextField()
    category = models.CharField(max_length=40, blank=True)

    embedding = VersionedEmbedding(source=["title", "body"])

    def __str__(self) -> str:
        return self.title
