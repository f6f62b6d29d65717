"""The built distributions of this repository, and a virtualenv with the wheel installed: shared
by the packaging test and the quickstart test (tests/test_packaging.py, tests/test_quickstart.py).

Invariants: the wheel is built from the sdist (``python -m build``'s default), so both are
checked by one build; the virtualenv gets the app *only* from the wheel (``--no-deps``,
``--no-index``) and every other package from the running interpreter's site-packages, added by a
``.pth`` line (a plain path: the editable install's finder there is not activated), so it is fast
and needs no network. The commands of those requirements that a project runs (``django-admin``,
``celery``) get launchers in the virtualenv's ``bin``, as pip writes them, for its interpreter.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIST_NAME = "django_embedding_versions"
# Distributions whose console scripts the wheel's virtualenv gets (they come from the shared
# site-packages, so pip does not write them there).
COMMANDS_OF = ("Django", "celery")


@dataclass(frozen=True)
class Dists:
    sdist: Path
    wheel: Path

    def wheel_names(self) -> list[str]:
        with zipfile.ZipFile(self.wheel) as archive:
            return archive.namelist()

    def wheel_text(self, name: str) -> str:
        with zipfile.ZipFile(self.wheel) as archive:
            return archive.read(name).decode()


def build(outdir: Path) -> Dists:
    """``python -m build`` of this repository into ``outdir`` (no isolation: the build backend
    comes from the running environment, requirements/dev.txt, so it works offline)."""
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(outdir), str(ROOT)],
        capture_output=True, text=True, cwd=ROOT,
    )
    if result.returncode != 0:
        raise AssertionError(f"python -m build failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    sdists = list(outdir.glob(f"{DIST_NAME}-*.tar.gz"))
    wheels = list(outdir.glob(f"{DIST_NAME}-*-py3-none-any.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in outdir.iterdir())
    return Dists(sdist=sdists[0], wheel=wheels[0])


@dataclass(frozen=True)
class WheelEnv:
    root: Path

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def python(self) -> Path:
        return self.bin / "python"

    @property
    def site_packages(self) -> Path:
        return Path(subprocess.run(
            [str(self.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True).stdout.strip())


def wheel_env(path: Path, wheel: Path) -> WheelEnv:
    """A new virtualenv at ``path`` with ``wheel`` installed, the other requirements seen through
    the running interpreter's site-packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    env = WheelEnv(path)
    shared = sysconfig.get_paths()["purelib"]
    (env.site_packages / "_shared_requirements.pth").write_text(shared + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(env.python), "install", "--quiet",
         "--no-deps", "--no-index", "--no-cache-dir", str(wheel)],
        check=True, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    for entry in importlib.metadata.entry_points(group="console_scripts"):
        if entry.dist is not None and entry.dist.name in COMMANDS_OF:
            script = env.bin / entry.name
            module, _, attr = entry.value.partition(":")
            head = attr.split(".")[0]
            script.write_text(f"#!{env.python}\nimport sys\nfrom {module} import {head}\n"
                              f"sys.exit({attr}())\n")
            script.chmod(0o755)
    return env
