"""The public API (issue 13, build 5): ``embeddings_app`` exports ``VersionedEmbedding`` and the
exceptions with ``__all__``, without importing the app's models when Django imports the package;
the package ships ``py.typed``; sources have one module that ``fields`` and ``sync`` both use (no
import cycle between them); every function-level import left in the app says why it is there."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import tomllib
from pathlib import Path

import embeddings_app
from embeddings_app import exceptions, fields, sources, sync
from tests.workers import ROOT

APP = Path(embeddings_app.__file__).parent


def test_the_public_names_import_from_the_package_and_all_lists_exactly_them():
    from embeddings_app import (  # noqa: F401  (the import is the test)
        ConfigurationError,
        EmbeddingError,
        Refused,
        UnknownTarget,
        UnknownVersion,
        VersionedEmbedding,
        VersionMismatch,
        VersionNotReady,
    )

    assert VersionedEmbedding is fields.VersionedEmbedding
    errors = {name for name, value in vars(exceptions).items()
              if inspect.isclass(value) and issubclass(value, exceptions.EmbeddingError)}
    assert set(embeddings_app.__all__) == errors | {"VersionedEmbedding"}
    assert len(embeddings_app.__all__) == len(set(embeddings_app.__all__))
    for name in errors:
        assert getattr(embeddings_app, name) is getattr(exceptions, name)


def test_importing_the_package_before_django_is_set_up_loads_no_model():
    """Django imports the package while it reads INSTALLED_APPS: the re-export must not import
    the app's models then (AppRegistryNotReady); a star import still gets every public name."""
    code = ("import sys, embeddings_app\n"
            "assert 'embeddings_app.models' not in sys.modules, 'models imported'\n"
            "assert 'embeddings_app.fields' not in sys.modules, 'fields imported'\n"
            "from embeddings_app.exceptions import Refused\n"
            "assert embeddings_app.Refused is Refused\n"
            "import django; django.setup()\n"
            "namespace = {}\n"
            "exec('from embeddings_app import *', namespace)\n"
            "assert set(embeddings_app.__all__) <= set(namespace), 'star import'\n"
            "print(namespace['VersionedEmbedding'].__module__)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**__import__("os").environ,
                                            "DJANGO_SETTINGS_MODULE": "tests.settings"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "embeddings_app.fields"


def test_the_package_ships_py_typed():
    assert (APP / "py.typed").is_file()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["embeddings_app"]


def _imports(module: object, level: str) -> list[tuple[str, int]]:
    """(module imported, line) of ``module``'s imports at module level or inside functions
    (``TYPE_CHECKING`` blocks left out)."""
    tree = ast.parse(inspect.getsource(module))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    in_functions = {id(inner) for node in ast.walk(tree)
                    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                    for inner in ast.walk(node) if inner is not node}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and (
                (id(node) in in_functions) == (level == "function")):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [f"{'.' * node.level}{node.module or ''}:{alias.name}" for alias in node.names])
            found.extend((name, node.lineno) for name in names)
    return found


def test_sources_are_one_module_that_neither_imports_fields_nor_sync():
    """The old cycle: fields imported sync inside functions, sync imported fields. Now both read
    sources from ``sources``, which imports neither; sync does not import fields at all."""
    for module in (sources, sync):
        names = [name for name, _ in _imports(module, "module") + _imports(module, "function")]
        assert not [name for name in names if ".fields" in name or name.startswith("fields")], (
            module.__name__)
    assert not [name for name, _ in _imports(sources, "module") if ".sync" in name]
    assert not _imports(fields, "function"), "fields imports what it uses at module level"
    assert issubclass(fields.VersionedEmbedding, sources.EmbeddingSource)


def test_no_module_of_the_app_imports_tasks_inside_a_function():
    """Batch dispatch lives in tasks.py: backfill (which tasks imports) never imports it."""
    modules = sorted(APP.rglob("*.py"))
    assert modules
    for path in modules:
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom):
                        assert not (inner.module or "").endswith("tasks"), (
                            f"{path.name}:{inner.lineno} imports tasks in a function")


def _comment(line: str) -> bool:
    """Whether ``line`` carries a comment other than a bare ``noqa``."""
    return "#" in line and not line.split("#", 1)[1].strip().startswith("noqa")


def _is_import(line: str) -> bool:
    return line.strip().startswith(("import ", "from "))


def test_every_function_level_import_left_in_the_app_is_labelled_with_a_comment():
    """Only load-bearing lazy imports remain (heavy or optional libraries, the app registry, a
    cycle), and each says why: a comment on its line or in the comment block just above it."""
    unlabelled = []
    for path in sorted(APP.rglob("*.py")):
        if "migrations" in path.parts:
            continue
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if not isinstance(inner, (ast.Import, ast.ImportFrom)):
                    continue
                own = lines[inner.lineno - 1]
                labelled = _comment(own)
                above = inner.lineno - 2  # up over blank lines and the imports of its block
                while not labelled and above >= 0 and (
                        not lines[above].strip() or _is_import(lines[above])):
                    labelled = _comment(lines[above])
                    above -= 1
                labelled = labelled or (above >= 0 and lines[above].strip().startswith("#"))
                if not labelled:
                    unlabelled.append(f"{path.relative_to(APP)}:{inner.lineno}: {own.strip()}")
    assert not unlabelled, unlabelled
