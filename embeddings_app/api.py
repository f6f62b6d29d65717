"""The ``openai`` provider: any OpenAI-compatible ``/v1/embeddings`` endpoint (OpenAI, Azure OpenAI,
vLLM, TEI, infinity, Ollama) through the official ``openai`` SDK.

Invariants (docs/providers.md):

* Requests are sized by inputs (``max_batch_inputs``) and tokens (``max_batch_tokens``, and a
  tenth of ``tokens_per_minute``); tokens are counted exactly with the model's tokenizer when
  ``model`` names a local folder holding a ``tokenizer.json`` (self-hosted servers serving a
  folder), otherwise bounded by ``len(text.encode("utf-8")) + 2``: no tokenizer in use
  (byte-level BPE, WordPiece, SentencePiece) makes more tokens than bytes, plus two specials.
* Every request first takes its tokens and one request from the rate limiter shared by all
  processes on all machines (``ratelimit``), so the configured TPM/RPM are never exceeded.
* 429 (honouring ``Retry-After``, shared with every process), 5xx, timeouts and dropped
  connections are transient: the request waits and is retried; when the retries are used up,
  ``ProviderUnavailable`` (a backfill batch is retried later by Celery; no row is marked failed).
  A 400/413/422 rejects the input: it propagates so that the caller isolates the bad row. A bad
  key, a missing permission or an unknown model is a ``ProviderError`` for the whole request.
* The API key is read from the environment variable named by ``api_key_env`` and never appears
  in a message, a log record, the admin or ``status``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import openai

from . import ratelimit
from .config import ModelSpec
from .encoders import RETRY_BUDGET, Encoder
from .exceptions import ProviderError, ProviderUnavailable

logger = logging.getLogger(__name__)

# A batch waits this long at most (sleeping between attempts, Retry-After included) before it
# gives up to Celery's retry; a query, which has a user waiting, much less.
DOCUMENT_RETRY_BUDGET = 120.0
QUERY_RETRY_BUDGET = 5.0
MAX_ATTEMPTS = 8
BACKOFF_BASE = 0.5
BACKOFF_MAX = 30.0
# Per token bound (see the module docstring): special tokens a tokenizer may add.
BOUND_SPECIAL_TOKENS = 2


def api_fingerprint(spec: ModelSpec) -> str:
    """The pinned identity of an API model: what is asked of which endpoint. Its files cannot be
    hashed; the stored probe vectors check that the answers stay the same."""
    identity = {"provider": spec.provider, "base_url": (spec.base_url or "").rstrip("/"),
                "model": spec.model, "revision": spec.revision, "dimensions": spec.dimensions,
                "settings": spec.encode_settings()}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


class TokenCounter:
    """Token counts of inputs: exact with a local ``tokenizer.json``, else a safe upper bound."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._tokenizer: Any = None
        path = Path(spec.model).expanduser() / "tokenizer.json"
        if path.is_file():
            from tokenizers import Tokenizer  # lazy: only an alias with a tokenizer.json needs it

            self._tokenizer = Tokenizer.from_file(str(path))
            self._tokenizer.no_truncation()
            self._tokenizer.no_padding()
            self._specials = len(self._tokenizer.encode("").ids)

    @property
    def exact(self) -> bool:
        return self._tokenizer is not None

    def count(self, texts: list[str]) -> list[int]:
        if self._tokenizer is None:
            return [len(text.encode("utf-8", "surrogatepass")) + BOUND_SPECIAL_TOKENS
                    for text in texts]
        return [len(encoding.ids) for encoding in self._tokenizer.encode_batch(texts)]

    def truncate(self, texts: list[str]) -> list[str]:
        """Cut each text to ``max_input_tokens`` (as a local model truncates to its maximum
        sequence length); without a tokenizer, to that many UTF-8 bytes (by the bound, never
        more tokens)."""
        limit = self.spec.max_input_tokens
        if limit is None:
            return texts
        if self._tokenizer is None:
            keep = max(limit - BOUND_SPECIAL_TOKENS, 1)
            return [text if len(text.encode("utf-8", "surrogatepass")) <= keep
                    else text.encode("utf-8", "surrogatepass")[:keep].decode("utf-8", "ignore")
                    for text in texts]
        result = []
        for text, encoding in zip(texts, self._tokenizer.encode_batch(texts, add_special_tokens=False),
                                  strict=True):
            keep = max(limit - self._specials, 1)
            result.append(text if len(encoding.ids) <= keep else text[:encoding.offsets[keep - 1][1]])
        return result


def plan_requests(counts: list[int], max_inputs: int, max_tokens: int) -> Iterator[tuple[int, int]]:
    """Consecutive ``[start, end)`` slices of at most ``max_inputs`` inputs and ``max_tokens``
    tokens each (an input larger than ``max_tokens`` alone)."""
    start, tokens = 0, 0
    for index, count in enumerate(counts):
        if index > start and (index - start >= max_inputs or tokens + count > max_tokens):
            yield start, index
            start, tokens = index, 0
        tokens += count
    if start < len(counts):
        yield start, len(counts)


def _retry_after(exc: openai.APIStatusError) -> float | None:
    headers = exc.response.headers
    try:
        if headers.get("retry-after-ms"):
            return float(headers["retry-after-ms"]) / 1000
        if headers.get("retry-after"):
            return float(headers["retry-after"])
    except ValueError:
        return None  # an HTTP date: fall back to backoff
    return None


class OpenAIEncoder(Encoder):
    provider = "openai"

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec, api_fingerprint(spec))
        self.tokens = TokenCounter(spec)
        self.limiter = ratelimit.SharedRateLimiter.for_spec(spec)
        self.max_request_tokens = min(spec.max_batch_tokens, self.limiter.max_request_tokens)

    @cached_property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(api_key=self._api_key() or "unused", base_url=self.spec.base_url,
                             timeout=self.spec.timeout, max_retries=0)  # our retries, shared limits

    def _api_key(self) -> str | None:
        name = self.spec.api_key_env
        if not name:
            return None
        value = os.environ.get(name)
        if not value:
            raise ProviderError(f'The environment variable {name} named by "api_key_env" of alias '
                                f'"{self.spec.alias}" is not set; set it to the API key.')
        return value

    def _redact(self, message: str) -> str:
        key = os.environ.get(self.spec.api_key_env or "") if self.spec.api_key_env else None
        return message.replace(key, "[redacted]") if key else message

    def _encode(self, texts: list[str], prompt: str | None, *, query: bool = False) -> np.ndarray:
        inputs = self.tokens.truncate([f"{prompt}{text}" if prompt else text for text in texts])
        counts = self.tokens.count(inputs)
        parts = [self._request(inputs[start:end], sum(counts[start:end]), query=query)
                 for start, end in plan_requests(counts, self.spec.max_batch_inputs,
                                                 self.max_request_tokens)]
        vectors = np.vstack(parts)
        if self.spec.truncate_dim is not None:
            vectors = vectors[:, :self.spec.truncate_dim]
        if self.spec.normalize:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def _encode_query(self, text: str) -> np.ndarray:
        # A user is waiting: a short retry budget, then a clear ProviderUnavailable.
        return self._encode([text], self.spec.query_prompt, query=True)[0]

    def _request(self, inputs: list[str], tokens: int, *, query: bool) -> np.ndarray:
        budget = QUERY_RETRY_BUDGET if query else (RETRY_BUDGET.get() or DOCUMENT_RETRY_BUDGET)
        waited = 0.0
        extra = {"dimensions": self.spec.dimensions} if self.spec.dimensions else {}
        for attempt in range(MAX_ATTEMPTS):
            slept, entry = self.limiter.acquire(
                tokens, max_wait=budget if budget < DOCUMENT_RETRY_BUDGET else None)
            waited += slept
            self.calls += 1
            try:
                try:
                    response = self.client.embeddings.create(
                        model=self.spec.model, input=inputs, encoding_format="float", **extra)
                finally:
                    self.limiter.finish(entry)
            except openai.RateLimitError as exc:
                delay = _retry_after(exc) or self._backoff(attempt)
                self.limiter.pause(delay)  # every process waits, not only this one
                reason = f"429 rate limited (Retry-After {delay:g}s)"
            except openai.InternalServerError as exc:
                delay, reason = self._backoff(attempt), f"server error {exc.status_code}"
            except openai.APITimeoutError:
                delay, reason = self._backoff(attempt), f"timed out after {self.spec.timeout:g}s"
            except openai.APIConnectionError as exc:
                cause = type(exc.__cause__ or exc).__name__
                delay, reason = self._backoff(attempt), f"connection failed ({cause})"
            except (openai.AuthenticationError, openai.PermissionDeniedError,
                    openai.NotFoundError) as exc:
                raise ProviderError(
                    f'{self.spec.base_url} refused model "{self.spec.model}" of alias '
                    f'"{self.spec.alias}" ({exc.status_code}): '
                    f"{self._redact(str(exc.message))[:300]}; check the key and the model name."
                ) from None
            except openai.APIStatusError as exc:
                if 400 <= exc.status_code < 500 and exc.status_code not in (408, 409):
                    # The input is to blame: the caller isolates the bad row.
                    raise InputRejected(
                        f"the API rejected the input ({exc.status_code}): "
                        f"{self._redact(str(exc.message))[:500]}") from None
                delay, reason = self._backoff(attempt), f"status {exc.status_code}"
            else:
                data = sorted(response.data, key=lambda item: item.index)
                if len(data) != len(inputs):
                    raise ProviderError(f"{self.spec.base_url} returned {len(data)} vectors for "
                                        f"{len(inputs)} inputs.")
                return np.asarray([item.embedding for item in data], dtype=np.float32)
            if waited + delay > budget or attempt == MAX_ATTEMPTS - 1:
                raise ProviderUnavailable(
                    f'The embedding API of alias "{self.spec.alias}" ({self.spec.base_url}) is '
                    f"unavailable: {reason}, {attempt + 1} attempts over {waited:.0f}s; "
                    + ("the search cannot embed its query now; try again later."
                       if query else "the batch will be retried.")) from None
            logger.warning("embedding request of alias %s: %s; retrying in %.1fs (attempt %d)",
                           self.spec.alias, reason, delay, attempt + 1)
            time.sleep(delay)
            waited += delay
        raise AssertionError("unreachable")

    @staticmethod
    def _backoff(attempt: int) -> float:
        return random.uniform(0, min(BACKOFF_MAX, BACKOFF_BASE * 2 ** attempt)) + BACKOFF_BASE


class InputRejected(ValueError):
    """The API rejected the input of a request (a 4xx other than auth/limits): isolated per row."""
