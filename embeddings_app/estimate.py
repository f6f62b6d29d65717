"""Estimate before spending: rows, tokens, requests, time at the configured limits and cost of a
backfill or a migration, computed from the table alone; the model or API is never called.

Tokens are counted as the ``openai`` provider counts them before sending (``api.TokenCounter``:
exact with a local ``tokenizer.json``, else the documented upper bound), after the prompt and
``max_input_tokens``; requests are planned as the backfill plans them, a page of ``batch_size``
rows at a time. Time is the larger of tokens/TPM and requests/RPM (unknown without limits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import registry, sources
from .config import ModelSpec, get_config
from .ratelimit import SharedRateLimiter

if TYPE_CHECKING:
    from .models import EmbeddingVersion


@dataclass(frozen=True)
class Estimate:
    alias: str
    rows: int  # rows to embed (missing or stale, with a non-empty source)
    tokens: int
    exact_tokens: bool
    requests: int | None  # API requests; None for a local model
    seconds: float | None  # at the configured limits; None without limits
    cost: float | None  # price_per_million_tokens x tokens; None without a price

    def lines(self) -> list[str]:
        counted = "exact, with the model's tokenizer" if self.exact_tokens else (
            "an upper bound: UTF-8 bytes + 2 per input, no tokenizer available offline")
        lines = [f"Estimate for model {self.alias} (nothing sent to the model):",
                 f"  rows to embed  {self.rows}",
                 f"  tokens         {self.tokens} ({counted})"]
        if self.requests is not None:
            lines.append(f"  requests       {self.requests}")
        lines.append("  time           " + (
            _duration(self.seconds) + " at the configured tokens_per_minute/requests_per_minute"
            if self.seconds is not None else "- (no tokens_per_minute/requests_per_minute set)"))
        lines.append("  cost           " + (f"{self.cost:.4f} (price_per_million_tokens x tokens)"
                                            if self.cost is not None else
                                            "- (no price_per_million_tokens set)"))
        return lines


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def for_texts(spec: ModelSpec, pages: list[list[str]]) -> Estimate:
    """The estimate of embedding ``pages`` of texts (each page one encode call) with ``spec``."""
    from .api import TokenCounter, plan_requests  # lazy: the SDK only where an API is estimated

    counter = TokenCounter(spec)
    prompt = spec.document_prompt or ""
    limiter = SharedRateLimiter.for_spec(spec)
    max_request_tokens = min(spec.max_batch_tokens, limiter.max_request_tokens)
    rows = tokens = requests = 0
    for page in pages:
        counts = counter.count(counter.truncate([f"{prompt}{text}" for text in page]))
        rows += len(page)
        tokens += sum(counts)
        requests += sum(1 for _ in plan_requests(counts, spec.max_batch_inputs, max_request_tokens))
    seconds = None
    if spec.is_api and (spec.tokens_per_minute or spec.requests_per_minute):
        seconds = 60 * max(tokens / spec.tokens_per_minute if spec.tokens_per_minute else 0,
                           requests / spec.requests_per_minute if spec.requests_per_minute else 0)
    cost = (tokens / 1_000_000 * spec.price_per_million_tokens
            if spec.price_per_million_tokens is not None else None)
    return Estimate(spec.alias, rows, tokens, counter.exact, requests if spec.is_api else None,
                    seconds, cost)


def _pages(target: str, version: EmbeddingVersion | None, page_size: int) -> list[list[str]]:
    """The source texts to embed, in pages of ``page_size``: every non-empty row (a new
    version), or the rows missing or stale for ``version``."""
    field = registry.get(target)
    versions = [version] if version is not None else []
    pages: list[list[str]] = []
    current: list[str] = []
    for page, _ in sources.iter_source_pages(field, versions, field.source_queryset(), page_size):
        for _pk, text, stored, _xmin in page:
            if not text.strip():
                continue
            if version is not None and stored[0] == field.source_hash(text):
                continue  # fresh
            current.append(text)
            if len(current) >= page_size:
                pages.append(current)
                current = []
    if current:
        pages.append(current)
    return pages


def for_backfill(version: EmbeddingVersion, batch_size: int | None = None) -> Estimate:
    spec = get_config().model(version.model_alias)
    size = batch_size or get_config().batch_size
    return for_texts(spec, _pages(version.target, version, size))


def for_migration(target: str, alias: str, batch_size: int | None = None) -> Estimate:
    spec = get_config().model(alias)
    size = batch_size or get_config().batch_size
    return for_texts(spec, _pages(registry.get(target).target, None, size))
