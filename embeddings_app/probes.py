"""Probe fingerprints: does the model still compute what it computed when the version was added?

At ``add`` a fixed probe set (built-in texts of several languages and lengths, plus a few rows
sampled from the table) is embedded and stored with the version. ``compare`` re-embeds the same
texts and measures the cosine of each new vector with the stored one. An API's files cannot be
hashed and a provider can change the model behind an unchanged name (a silent upgrade, a
pooling change); a local model's library versions can change the output as well. Probes catch
both: a version whose probes fall below its tolerance (the alias's ``verify_threshold``, else
``EMBEDDINGS["VERIFY_THRESHOLD"]``) fails ``verify``, cannot be activated, fails
``check --deploy`` and shows in ``status`` and the admin.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from django.utils import timezone

from . import encoders, registry
from .config import ModelSpec, get_config
from .exceptions import EmbeddingError, ProviderError
from .models import EmbeddingVersion

if TYPE_CHECKING:
    from .encoders import Encoder

SAMPLED_ROWS = 3
# Seconds an API may spend retrying transient failures of one probe comparison: a probe run by
# check --deploy or beat reports an outage quickly instead of waiting out the backfill budget.
RETRY_BUDGET = 10.0
PROBE_TEXTS = (
    "ok",
    "The quick brown fox jumps over the lazy dog.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Le vif renard brun saute par-dessus le chien paresseux près de la rivière.",
    "Быстрая коричневая лиса перепрыгивает через ленивую собаку.",
    "敏捷的棕色狐狸跳过了懒狗。",
    "東京の明日の天気は晴れでしょう。",
    "مرحبا بالعالم، هذا نص قصير للاختبار.",
    "SELECT id, title FROM articles WHERE price > 19.99 AND published >= '2026-12-01';",
    ("Central banks raised interest rates again this quarter, citing persistent inflation in "
     "services and housing. Analysts expect borrowing costs to stay high until wage growth "
     "slows, while exporters warn that a stronger currency is already hurting orders. "
     "Meanwhile, the football season opened with a surprise win for the promoted side, whose "
     "young striker scored twice in the second half, and a new film about the early days of "
     "computing topped the box office over the weekend.") * 3,
)


def threshold_for(spec: ModelSpec) -> float:
    return spec.verify_threshold if spec.verify_threshold is not None else (
        get_config().verify_threshold)


def sample_texts(target: str, count: int = SAMPLED_ROWS) -> list[str]:
    """A few non-empty source texts of the target's rows, chosen at random."""
    field_ = registry.get(target)
    texts = []
    for obj in field_.source_queryset().order_by("?")[:count * 3]:
        text = field_.source_text(obj)
        if text.strip():
            texts.append(text)
        if len(texts) >= count:
            break
    return texts


def initial(encoder: Encoder, target: str) -> tuple[list[str], bytes]:
    """The probe texts of a new version and their vectors: the built-in texts and a few sampled
    rows (left out if the model rejects one of them: a bad row must not block ``add``)."""
    texts = [*PROBE_TEXTS, *sample_texts(target)]
    try:
        return texts, embed(encoder, texts)
    except ProviderError:
        raise
    except Exception:  # a sampled row the model rejects (an API's 400, a tokenizer error)
        return list(PROBE_TEXTS), embed(encoder, list(PROBE_TEXTS))


def embed(encoder: Encoder, texts: list[str]) -> bytes:
    return np.ascontiguousarray(encoder.encode_documents(texts), dtype=np.float32).tobytes()


def stored_vectors(version: EmbeddingVersion) -> np.ndarray | None:
    if not version.probe_texts or not version.probe_vectors:
        return None
    raw = np.frombuffer(bytes(version.probe_vectors), dtype=np.float32)
    return raw.reshape(len(version.probe_texts), -1)


@dataclass
class ProbeReport:
    version: str
    threshold: float
    recorded: bool = True  # False: the version was added before probes existed
    reachable: bool = True  # False: the model could not be asked (an outage): no verdict
    texts: int = 0
    min_cosine: float | None = None
    cosines: list[float] = field(default_factory=list)
    library_versions_then: dict[str, str] = field(default_factory=dict)
    library_versions_now: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def summary(self) -> str:
        if not self.recorded:
            return f"probe {self.version}: no probes recorded (added before probes existed)."
        if self.passed:
            return (f"probe {self.version}: {self.texts} probes match (min cosine "
                    f"{self.min_cosine:.5f} >= {self.threshold}).")
        return f"probe {self.version} FAILED: " + "; ".join(self.problems) + "."


def compare(version: EmbeddingVersion, encoder: Encoder | None = None) -> ProbeReport:
    """Re-embed ``version``'s probes with its alias's model now and compare (never raises for a
    mismatch; an unreachable provider is reported as a problem)."""
    spec = get_config().model(version.model_alias)
    report = ProbeReport(version=str(version), threshold=threshold_for(spec),
                         library_versions_then=dict(version.library_versions or {}))
    stored = stored_vectors(version)
    if stored is None:
        report.recorded = False
        return report
    report.texts = len(version.probe_texts)
    budget = encoders.RETRY_BUDGET.set(RETRY_BUDGET)
    try:
        encoder = encoder or encoders.load(spec)
        report.library_versions_now = encoder.library_versions()
        fresh = encoder.encode_documents(list(version.probe_texts))
    except EmbeddingError as exc:
        report.reachable = False
        report.problems.append(f"the probes could not be embedded: {exc}")
        return report
    finally:
        encoders.RETRY_BUDGET.reset(budget)
    if fresh.shape != stored.shape:
        report.problems.append(f"the model now outputs {fresh.shape[1]} dimensions, the probes "
                               f"were {stored.shape[1]}")
        return report
    cosines = np.einsum("ij,ij->i", stored, fresh) / (
        np.linalg.norm(stored, axis=1) * np.linalg.norm(fresh, axis=1) + 1e-12)
    report.cosines = [round(float(value), 6) for value in cosines]
    report.min_cosine = float(cosines.min())
    below = [i for i, value in enumerate(cosines) if value < report.threshold]
    if below:
        changed = ", ".join(
            f"{version.probe_texts[i][:24]!r}: {cosines[i]:.4f}" for i in below[:5])
        libraries = ""
        if report.library_versions_then and (
                report.library_versions_then != report.library_versions_now):
            libraries = (f"; libraries changed: {report.library_versions_then} -> "
                         f"{report.library_versions_now}")
        report.problems.append(
            f"the model's output changed under the same name: {len(below)} of {report.texts} "
            f"probes below cosine {report.threshold} (min {report.min_cosine:.4f}; {changed})"
            f"{libraries}; add a new version for the new output and migrate to it, or pin the "
            "provider/libraries back")
    return report


def run(version: EmbeddingVersion, encoder: Encoder | None = None) -> ProbeReport:
    """``compare`` and record the result on the version (``status``, the admin, ``activate``)."""
    report = compare(version, encoder)
    if report.recorded and report.reachable:  # an outage says nothing about the output
        EmbeddingVersion.objects.filter(pk=version.pk).update(
            probed_at=timezone.now(), probe_passed=report.passed, probe_report=report.as_dict())
        version.probed_at, version.probe_passed = timezone.now(), report.passed
        version.probe_report = report.as_dict()
    return report
