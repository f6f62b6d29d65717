"""Probe fingerprints of a local model: recorded at `add` with the library versions; a library
upgrade triggers the probe comparison instead of a refusal; a changed output fails `probe`,
`verify`, `activate`, `check --deploy` and shows in `status`."""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError, SystemCheckError
from django.urls import reverse

from embeddings_app import encoders, lifecycle, probes, registry, search
from embeddings_app.config import get_config
from embeddings_app.exceptions import ProbeMismatch, VersionNotReady
from embeddings_app.models import EmbeddingVersion
from tests.conftest import TARGET

pytestmark = pytest.mark.django_db


@pytest.fixture
def version(make_articles):
    make_articles(12)
    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny")
    return EmbeddingVersion.objects.get(target=TARGET, version="v1")


def other_models_probe_vectors(version: EmbeddingVersion) -> bytes:
    """What the probes would give if the files behind "tiny" computed another model's output."""
    other = encoders.load(get_config().model("tiny_other"))
    return probes.embed(other, list(version.probe_texts))


def test_add_records_probe_vectors_of_builtin_and_sampled_texts_and_the_libraries(version):
    assert version.probe_texts[:len(probes.PROBE_TEXTS)] == list(probes.PROBE_TEXTS)
    assert len(version.probe_texts) == len(probes.PROBE_TEXTS) + probes.SAMPLED_ROWS
    assert probes.stored_vectors(version).shape == (len(version.probe_texts), version.dimensions)
    assert set(version.library_versions) == {"sentence-transformers", "transformers", "torch"}


def test_probe_passes_and_prints_the_measured_cosines(version, capsys):
    call_command("embeddings", "probe", TARGET)
    out = capsys.readouterr().out
    assert f"probe {TARGET}@v1: {len(version.probe_texts)} probes match (min cosine" in out
    cosines = [float(value) for value in out.split("cosines ")[1].split()]
    assert len(cosines) == len(version.probe_texts) and min(cosines) > 0.9999
    version.refresh_from_db()
    assert version.probe_passed is True and version.probed_at is not None


def test_a_library_upgrade_runs_the_probes_instead_of_refusing(version):
    EmbeddingVersion.objects.filter(pk=version.pk).update(
        library_versions={**version.library_versions, "torch": "1.0.0"})
    version.refresh_from_db()
    encoder = encoders.for_version(version)  # not refused: the output is unchanged
    assert encoder.fingerprint == version.fingerprint
    version.refresh_from_db()
    assert version.probe_passed is True
    assert version.probe_report["library_versions_then"]["torch"] == "1.0.0"


def test_a_changed_output_fails_probe_verify_activate_status_admin_and_check_deploy(
        version, capsys, admin_client):
    call_command("embeddings", "backfill", TARGET, "v1", "--inline")
    call_command("embeddings", "activate", TARGET, "v1", "--force")
    changed = other_models_probe_vectors(version)
    EmbeddingVersion.objects.filter(pk=version.pk).update(
        probe_vectors=changed, library_versions={**version.library_versions, "torch": "1.0.0"})
    version.refresh_from_db()

    with pytest.raises(CommandError, match=r"probes failed for news\.Article\.embedding@v1"):
        call_command("embeddings", "probe", TARGET)
    out = capsys.readouterr().out
    assert "the model's output changed under the same name" in out
    cosines = [float(value) for value in out.split("cosines ")[1].split()]
    assert min(cosines) < 0.9  # measured: two different random models

    with pytest.raises(ProbeMismatch, match="libraries changed"):
        encoders.for_version(version)  # a library change whose output differs refuses
    with pytest.raises(ProbeMismatch):
        search.search(registry.get(TARGET), "a query")

    with pytest.raises(CommandError, match="probes: the model's output changed"):
        call_command("embeddings", "verify", TARGET, "v1")

    call_command("embeddings", "status", TARGET)
    assert "CHANGED (" in capsys.readouterr().out
    page = admin_client.get(reverse("admin:embeddings_app_embeddingversion_change",
                                    args=[version.pk])).content.decode()
    assert "CHANGED: the model&#x27;s output changed under the same name" in page

    with pytest.raises(SystemCheckError, match=r"embeddings\.E103"):
        call_command("check", "--deploy")

    EmbeddingVersion.objects.filter(pk=version.pk).update(state="ready")
    with pytest.raises(VersionNotReady):
        lifecycle.activate(TARGET, "v1")
    problems = lifecycle.activation_problems(EmbeddingVersion.objects.get(pk=version.pk))
    assert any("no longer computes its probe vectors" in problem for problem in problems)


def test_the_probe_task_for_celery_beat_records_each_versions_result(version):
    from embeddings_app import tasks

    assert tasks.probe.apply(args=[TARGET]).get() == {f"{TARGET}@v1": True}
    EmbeddingVersion.objects.filter(pk=version.pk).update(
        probe_vectors=other_models_probe_vectors(version))
    assert tasks.probe.apply().get() == {f"{TARGET}@v1": False}
    assert EmbeddingVersion.objects.get(pk=version.pk).probe_passed is False
