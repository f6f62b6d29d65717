"""Async views of the async search tests (tests/test_async_search.py), served by a real ASGI
server: each calls the app's async API as a user's ASGI view would."""

from __future__ import annotations

import json

from django.http import HttpRequest, JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

from embeddings_app.exceptions import VersionMismatch
from project.news.models import Article


def _results(articles: list[Article]) -> JsonResponse:
    return JsonResponse({"results": [
        {"pk": a.pk, "version": a.embedding_version, "distance": float(a.distance)}
        for a in articles]})


async def search(request: HttpRequest) -> JsonResponse:
    queryset = None
    if "category" in request.GET:
        queryset = Article.objects.filter(category=request.GET["category"])
    return _results(await Article.embedding.asearch(
        request.GET["q"], k=int(request.GET.get("k", "5")), queryset=queryset))


@csrf_exempt  # a JSON API called by the test's HTTP client, no browser session
async def search_vector(request: HttpRequest) -> JsonResponse:
    body = json.loads(request.body)
    try:
        found = await Article.embedding.asearch_vector(body["vector"], version=body["version"],
                                                       k=body.get("k", 5))
    except VersionMismatch as exc:
        return JsonResponse({"error": str(exc)}, status=409)
    return _results(found)


async def vector(request: HttpRequest, pk: int) -> JsonResponse:
    article = await Article.objects.aget(pk=pk)
    stored = await article.embedding.avector(request.GET.get("version"))
    return JsonResponse({"vector": None if stored is None else stored.tolist()})


urlpatterns = [
    path("search", search),
    path("search-vector", search_vector),
    path("vector/<int:pk>", vector),
]
