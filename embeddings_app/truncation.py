"""Truncation made visible: how many rows of a version exceed its model's token limit, and by
how much. A model reads at most its limit and silently drops the rest of a row, so a version
whose limit is shorter than its rows can score worse for that reason alone.

Invariants:

* Tokens are counted with the model's own tokenizer, as the model cuts its input: a local
  (sentence-transformers) model, with ``model.tokenizer``, special tokens included and the
  alias's ``document_prompt`` put before the text, against ``model.max_seq_length``; an API
  alias, against its declared ``max_input_tokens`` with the tokenizer of a local model folder
  (``api.TokenCounter``, exact). Where either is missing the figure is *unknown*, with the
  reason; it is never estimated.
* A row *exceeds* the limit when its token count is greater than the limit; its *overflow* is the
  count minus the limit (the tokens the model never reads).
* At most ``EMBEDDINGS["TRUNCATION_SAMPLE"]`` rows are counted (default 1,000): every row of a
  table that has no more, else a uniform random sample of the whole table; the figure states how
  many rows were sampled of how many. Rows with empty text are not embedded and not counted; a
  row the tokenizer rejects (e.g. a lone surrogate) is left out and counted as such: measuring
  never makes ``add``, ``verify`` or ``compare`` fail.
* A chunked version (``chunking``) cuts no row: its figure says so (0%, ``chunked``) and keeps
  the count of rows a whole-row version of its model would cut.
* ``add``, ``verify`` and ``compare`` measure (they load the model anyway) and store the figure
  on the version (``EmbeddingVersion.truncation``); ``status`` and the admin only read it, so they
  never load a model or tokenize. ``compare`` counts both versions on the same rows.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from django.utils import timezone

from . import limits, registry
from .config import ModelSpec, get_config
from .models import EmbeddingVersion

if TYPE_CHECKING:
    from .encoders import Encoder
    from .sources import EmbeddingSource

TOKENIZE_CHUNK = 256  # texts tokenized per call
READ_CHUNK = 1000  # rows whose source text is read per query


@dataclass
class Truncation:
    """One measurement (``as_dict`` is what the version stores)."""

    limit: int | None = None  # tokens the model reads; None: unknown
    counted_with: str = ""  # the tokenizer that counted
    unknown: str = ""  # why there is no figure ("" when there is one)
    rows: int = 0  # rows in the table when measured
    sampled: int = 0  # rows read: all of them, or a random sample
    counted: int = 0  # sampled rows with text (the ones the model embeds)
    over: int = 0  # counted rows longer than the limit
    uncountable: int = 0  # sampled rows the tokenizer rejects (the model cannot embed them either)
    median_overflow: float | None = None  # tokens beyond the limit, median of the rows over it
    max_overflow: int | None = None
    median_tokens: float | None = None  # of every counted row
    # A chunked version's chunk size: it cuts no row (each chunk fits the limit); the counts
    # above then say how many rows a whole-row version of the model would cut.
    chunked: int | None = None
    measured_at: str = ""
    by: str = ""  # "add", "verify", "compare"
    keys: list[str] = field(default_factory=list, repr=False)  # the counted rows (not stored)
    tokens: list[int] = field(default_factory=list, repr=False)  # their counts (not stored)

    @property
    def known(self) -> bool:
        return not self.unknown and self.limit is not None

    @property
    def percent(self) -> float | None:
        """The share of rows cut (0 for a chunked version, which cuts none)."""
        if self.chunked and self.known and self.counted:
            return 0.0
        return self.whole_row_percent

    @property
    def whole_row_percent(self) -> float | None:
        """The share of rows longer than the limit (cut by a whole-row version)."""
        return 100.0 * self.over / self.counted if self.known and self.counted else None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["keys"], data["tokens"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Truncation | None:
        if not data:
            return None
        names = set(cls.__dataclass_fields__) - {"keys", "tokens"}
        return cls(**{key: value for key, value in data.items() if key in names})

    def summary(self) -> str:
        """One sentence: what exceeds the limit, by how much, and on how many rows."""
        if not self.known:
            return f"token limit unknown: {self.unknown}"
        if not self.counted:
            return (f"no row with text to count against its limit of {self.limit} tokens "
                    f"({self.rows} rows)")
        line = f"{self.over} of {self.counted} rows exceed {self.limit} tokens"
        if self.chunked:
            line = (f"no row cut: chunks of {self.chunked} tokens ({line}, "
                    f"{self.whole_row_percent:.1f}%, embedded as several chunks)")
        else:
            line += f" ({self.percent:.1f}%)"
        if self.over and not self.chunked:
            line += (f", median overflow {self.median_overflow:.0f} tokens "
                     f"(max {self.max_overflow})")
        if self.sampled < self.rows:
            line += f"; {self.sampled} of {self.rows} rows sampled"
        else:
            line += f"; all {self.rows} rows counted"
        empty = self.sampled - self.counted - self.uncountable
        if empty:
            line += f" ({empty} with empty text, not embedded)"
        if self.uncountable:
            line += f" ({self.uncountable} the tokenizer rejects, not counted)"
        return line

    def cell(self) -> str:
        """A few characters for a table cell: "41.2% >128", "unknown", "no text"."""
        if not self.known:
            return "unknown"
        if not self.counted:
            return "no text"
        if self.chunked:
            return f"0% chunked:{self.chunked}"
        return f"{self.percent:.1f}% >{self.limit}"

    def when(self) -> str:
        """Where and when the figure was measured, e.g. "verify 2026-12-01 23:10 UTC"."""
        stamp = self.measured_at[:16].replace("T", " ")
        return f"{self.by} {stamp} UTC".strip() if stamp else self.by


def stored(version: EmbeddingVersion) -> Truncation | None:
    """The version's last measurement, or None if it was never measured."""
    return Truncation.from_dict(version.truncation)


def cell(version: EmbeddingVersion) -> str:
    figure = stored(version)
    return "-" if figure is None else figure.cell()


# --- counting ------------------------------------------------------------------------------------
Counter = Callable[[list[str]], list[int]]


def counter_for(spec: ModelSpec, encoder: Encoder | None) -> tuple[int, Counter, str] | str:
    """(limit, token counter, what counts) for ``spec``'s model, or why that is unknown.

    A local model needs its loaded ``encoder``; an API alias needs none (its tokenizer, if any,
    is a local file: nothing is sent to the provider)."""
    prompt = spec.document_prompt or ""
    if spec.is_api:
        if spec.max_input_tokens is None:
            return (f'alias "{spec.alias}" declares no max_input_tokens, so the limit of the '
                    f"provider's model is not known here (set it to the provider's documented "
                    "limit)")
        from .api import TokenCounter  # lazy: the SDK is loaded only where an API is used

        tokens = TokenCounter(spec)
        if not tokens.exact:
            return (f'no tokenizer for "{spec.model}" here (a local model folder with a '
                    "tokenizer.json counts exactly); its rows are not counted against "
                    f"max_input_tokens {spec.max_input_tokens}")
        return (spec.max_input_tokens,
                lambda texts: tokens.count([prompt + text for text in texts]),
                "tokenizer.json of the model folder")
    if encoder is None:
        return f'model of alias "{spec.alias}" not loaded'
    model = getattr(encoder, "model", None)
    try:
        tokenizer = model.tokenizer if model is not None else None
    except AttributeError:  # a first module without a tokenizer (e.g. static embeddings)
        tokenizer = None
    limit = getattr(model, "max_seq_length", None)
    if tokenizer is None or not callable(tokenizer):
        return f"the model of alias \"{spec.alias}\" has no text tokenizer to count with"
    if not isinstance(limit, int) or limit <= 0:
        return f"the model of alias \"{spec.alias}\" declares no max_seq_length"

    def count(texts: list[str]) -> list[int]:
        # The whole text, special tokens included, as the model's input before it is cut;
        # verbose=False: no "longer than the maximum" warning per call, that is the point here.
        encoded = tokenizer([prompt + text for text in texts], add_special_tokens=True,
                            truncation=False, padding=False, return_attention_mask=False,
                            return_token_type_ids=False, verbose=False)
        return [len(ids) for ids in encoded["input_ids"]]

    return limit, count, f"{type(tokenizer).__name__} of the model"


def sample_keys(field_: EmbeddingSource, sample: int | None = None) -> tuple[list[Any], int]:
    """(the primary keys to count, the table's row count): every row of a table of at most
    ``sample`` rows, else a uniform random sample of ``sample`` of them."""
    sample = get_config().truncation_sample if sample is None else sample
    limits.integer("The truncation sample", sample, 1, limits.MAX_TRUNCATION_SAMPLE, "sample")
    manager = field_.model._base_manager
    total = manager.count()
    keys = manager.order_by("pk" if total <= sample else "?").values_list("pk", flat=True)
    return list(keys[:sample]), total


def measure(target: str, spec: ModelSpec, encoder: Encoder | None, *, by: str,
            keys: Sequence[Any] | None = None, rows: int | None = None,
            sample: int | None = None, chunked: int | None = None) -> Truncation:
    """Count the tokens of sampled rows of ``target`` (or of ``keys``, out of ``rows``) against
    ``spec``'s model limit (see the module docstring)."""
    now = timezone.now().isoformat()
    found = counter_for(spec, encoder)
    if isinstance(found, str):
        return Truncation(unknown=found, measured_at=now, by=by)
    limit, count, counted_with = found
    field_ = registry.get(target)
    if keys is None:
        keys, rows = sample_keys(field_, sample)
    keys = list(keys)
    figure = Truncation(limit=limit, counted_with=counted_with, rows=len(keys) if rows is None
                        else rows, sampled=len(keys), measured_at=now, by=by, chunked=chunked)
    texts: list[tuple[str, str]] = []
    for start in range(0, len(keys), READ_CHUNK):
        chunk = keys[start:start + READ_CHUNK]
        objects = {obj.pk: obj for obj in field_.source_queryset().filter(pk__in=chunk)}
        for pk in chunk:
            obj = objects.get(pk)
            text = field_.source_text(obj) if obj is not None else ""
            if text.strip():  # as sync: a blank source is not embedded
                texts.append((str(pk), text))
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        part = texts[start:start + TOKENIZE_CHUNK]
        try:
            counts = count([text for _, text in part])
        except Exception:  # a text the tokenizer rejects (the library's own error types vary)
            counts = None
        if counts is None:  # one by one: the rejected rows are left out and said so
            counted = []
            for key, text in part:
                try:
                    counted.append((key, count([text])[0]))
                except Exception:  # e.g. a lone surrogate: the model cannot embed it either
                    figure.uncountable += 1
            part = [(key, "") for key, _ in counted]
            counts = [tokens for _, tokens in counted]
        figure.keys += [key for key, _ in part]
        figure.tokens += counts
    figure.counted = len(figure.tokens)
    overflows = [tokens - limit for tokens in figure.tokens if tokens > limit]
    figure.over = len(overflows)
    if overflows:
        figure.median_overflow = float(statistics.median(overflows))
        figure.max_overflow = max(overflows)
    if figure.tokens:
        figure.median_tokens = float(statistics.median(figure.tokens))
    return figure


def record(version: EmbeddingVersion, figure: Truncation) -> None:
    """Store ``figure`` as the version's last measurement (status and the admin show it)."""
    version.truncation = figure.as_dict()
    EmbeddingVersion.objects.filter(pk=version.pk).update(truncation=version.truncation)


def explain(name_a: str, a: Truncation | None, name_b: str, b: Truncation | None,
            recall_a: float | None, recall_b: float | None, k: int) -> str:
    """A line for ``compare`` when the version with the lower recall also cuts clearly more rows
    (5 percentage points or more): its score may come from truncation, not from the model."""
    if None in (a, b, recall_a, recall_b) or recall_a == recall_b:
        return ""
    assert a is not None and b is not None and recall_a is not None and recall_b is not None
    if a.percent is None or b.percent is None:
        return ""
    (low, low_fig), (high, high_fig) = sorted(
        [(name_a, a), (name_b, b)], key=lambda item: recall_a if item[0] == name_a else recall_b)
    if low_fig.percent - high_fig.percent < 5.0:  # type: ignore[operator]
        return ""
    return (f"note: {low} scores lower recall@{k} and cuts more rows: {low_fig.percent:.0f}% of "
            f"its rows exceed {low_fig.limit} tokens against {high_fig.percent:.0f}% at "
            f"{high_fig.limit} for {high}. The text after a row's limit is not in its vector, so "
            f"queries matching it miss: the lower score may come from truncation, not the model.")
