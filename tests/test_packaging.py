"""The distributions: ``python -m build`` gives an sdist and a wheel that carry the whole app (every
file of the package directory: Python modules, migrations, templates, static files, ``py.typed``
once it is there), the licence, the changelog and true metadata; and the wheel installs into a new
virtualenv where ``import embeddings_app`` is the wheel's copy, not this repository's."""

from __future__ import annotations

import re
import subprocess
import tarfile
from email.parser import Parser
from pathlib import Path

import django

import embeddings_app
from tests.packaging import ROOT, Dists, WheelEnv

PACKAGE = ROOT / "embeddings_app"


def _package_files() -> set[str]:
    """Every file under embeddings_app/ that git tracks (what a clean clone has)."""
    listed = subprocess.run(["git", "ls-files", "embeddings_app"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    return {name for name in listed if (ROOT / name).is_file()}


def _metadata(dists: Dists) -> object:
    name = next(n for n in dists.wheel_names() if n.endswith(".dist-info/METADATA"))
    return Parser().parsestr(dists.wheel_text(name))


def test_the_wheel_carries_every_file_of_the_package_directory(dists: Dists) -> None:
    names = set(dists.wheel_names())
    expected = _package_files()
    assert any("/migrations/0001_initial.py" in n for n in expected)
    assert any(n.startswith("embeddings_app/templates/") for n in expected)
    assert any(n.startswith("embeddings_app/static/") for n in expected)
    assert "embeddings_app/py.typed" in expected  # PEP 561: the app's annotations are its types
    missing = sorted(expected - names)
    assert not missing, f"not in the wheel: {missing}"
    extra = sorted(n for n in names if not n.startswith("embeddings_app/")
                   and ".dist-info/" not in n)
    assert not extra, f"the wheel carries files outside the package: {extra}"


def test_the_wheel_metadata_names_version_licence_python_and_django(dists: Dists) -> None:
    meta = _metadata(dists)
    assert meta["Name"] == "django-embedding-versions"
    assert meta["Version"] == embeddings_app.__version__
    assert dists.wheel.name == f"django_embedding_versions-{embeddings_app.__version__}-py3-none-any.whl"
    assert meta["License-Expression"] == "MIT"
    assert meta["Requires-Python"] == ">=3.11"
    classifiers = meta.get_all("Classifier")
    for wanted in ("Framework :: Django :: 5.2", "Framework :: Django :: 6.1", "Typing :: Typed",
                   "Programming Language :: Python :: 3.11",
                   "Programming Language :: Python :: 3.12"):
        assert wanted in classifiers
    assert any(r.startswith("Django>=5.2") for r in meta.get_all("Requires-Dist"))
    licence = [n for n in dists.wheel_names() if n.endswith(".dist-info/licenses/LICENSE")]
    assert licence and "MIT License" in dists.wheel_text(licence[0])
    assert "# django-embedding-versions" in meta.get_payload()  # the README is the description


def test_the_sdist_carries_the_package_licence_changelog_and_docs_but_no_tests(dists: Dists) -> None:
    with tarfile.open(dists.sdist) as archive:
        top = f"django_embedding_versions-{embeddings_app.__version__}/"
        names = {name.removeprefix(top) for name in archive.getnames()}
    for wanted in ("pyproject.toml", "LICENSE", "CHANGELOG.md", "README.md", "docs/backfill.md",
                   *_package_files()):
        assert wanted in names, f"{wanted} not in the sdist"
    assert not [n for n in names if n.startswith(("tests/", "project/", "benchmarks/"))]
    assert f"## [{embeddings_app.__version__}]" in (ROOT / "CHANGELOG.md").read_text()


def test_the_installed_app_is_the_wheels_copy_with_its_templates_and_migrations(
        wheel_venv: WheelEnv, tmp_path: Path) -> None:
    script = (
        "import importlib.metadata, pathlib, embeddings_app\n"
        "root = pathlib.Path(embeddings_app.__file__).parent\n"
        "print(root)\n"
        "print(importlib.metadata.version('django-embedding-versions'))\n"
        "print((root / 'templates/admin/embeddings_app/embeddingversion/change_list.html').is_file())\n"
        "print((root / 'static/embeddings_app/status.js').is_file())\n"
        "print((root / 'migrations/0001_initial.py').is_file())\n"
    )
    out = subprocess.run([str(wheel_venv.python), "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, check=True, env={"PATH": "/usr/bin:/bin"}).stdout.split("\n")
    location = Path(out[0])
    assert location == wheel_venv.site_packages / "embeddings_app"
    assert not location.is_relative_to(ROOT)
    assert out[1:5] == [embeddings_app.__version__, "True", "True", "True"]


def test_the_readme_requirements_name_the_django_and_python_versions_the_wheel_and_pins_do(
        dists: Dists) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Requirements\n", 1)[1].split("\n## ", 1)[0]
    django_row = re.search(r"^\| Django \| ([0-9.]+) LTS and ([0-9.]+) ", section, re.MULTILINE)
    python_row = re.search(r"^\| Python \| ([0-9.]+)\+ ", section, re.MULTILINE)
    assert django_row and python_row, section
    documented = set(django_row.groups())
    meta = _metadata(dists)
    classified = {c.rsplit(" :: ", 1)[1] for c in meta.get_all("Classifier")
                  if c.startswith("Framework :: Django :: ")}
    assert classified == documented
    pinned = set()
    for version in documented:
        pins = (ROOT / "requirements" / f"django-{version}.txt").read_text()
        pin = re.search(r"^Django==([0-9.]+)$", pins, re.MULTILINE)
        assert pin and pin[1].startswith(version + "."), pins
        pinned.add(version)
    assert pinned == documented
    assert meta["Requires-Python"] == f">={python_row[1]}"
    assert django.get_version().rsplit(".", 1)[0] in documented  # this run's Django is one of them
