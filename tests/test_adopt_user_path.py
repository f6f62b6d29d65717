"""The path of a typical user, end to end, with the real commands in their own processes: an app
whose model has a ``pgvector.django.VectorField`` filled by the user's own code (MiniLM, through
sentence-transformers directly) -> ``adopt`` it as v1 -> index, verify, activate -> ``migrate`` to
v2 (another model, another dimension) -> retire v1 -> ``drop`` v1 refused while the column is a
field of the model, with the exact steps -> the user removes the field, ``makemigrations``,
``migrate`` -> ``drop`` v1 finishes.

The user's app is written to a temporary folder (its models.py is edited in the middle, as the
user would); the commands run on the test database (``DATABASE_URL``)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from django.db import connection

from tests.workers import ROOT, database_url

pytestmark = pytest.mark.django_db(transaction=True)

TARGET = "userapp.Paper.embedding"

MODELS = '''
from django.db import models
from pgvector.django import VectorField

from embeddings_app.fields import VersionedEmbedding


class Paper(models.Model):
    title = models.CharField(max_length=300)
    abstract = models.TextField()
    vector = VectorField(dimensions=384, null=True, blank=True)  # filled by the user's own code

    embedding = VersionedEmbedding(source=["title", "abstract"])
'''

# The user's existing code: its own sentence-transformers call, the text it always embedded.
FILL = '''
from django.conf import settings
from sentence_transformers import SentenceTransformer

from project.news.corpus import iter_articles
from userapp.models import Paper

model = SentenceTransformer(settings.EMBEDDINGS["MODELS"]["minilm"]["model"], device="cpu")
items = list(iter_articles(30))
papers = Paper.objects.bulk_create([Paper(title=i.title, abstract=i.body) for i in items])
vectors = model.encode([f"{p.title}\\n\\n{p.abstract}" for p in papers[:25]])
for paper, vector in zip(papers[:25], vectors):  # the last 5 were never embedded
    paper.vector = vector
    paper.save(update_fields=["vector"])
print("filled", len(papers))
'''

SEARCH = """
from userapp.models import Paper
hits = Paper.embedding.search("central bank interest rates inflation", k=3)
print("hits", [(hit.pk, hit.embedding_version) for hit in hits])
"""

# The user's commands from adopt to the refused drop, each as `manage.py embeddings ...` runs it
# (call_command parses the same arguments), in one process: a process per command costs seconds.
COMMANDS = """
from django.core.management import CommandError, call_command
T = "userapp.Paper.embedding"
from embeddings_app.checks import check_adopted_model_fields
for args in (["adopt", T, "v1", "--model", "minilm", "--column", "vector", "--inline"], "check",
             ["index", T, "v1"], ["verify", T, "v1"], ["activate", T, "v1"], "search",
             ["migrate", T, "--to", "tiny", "--inline"], "search", ["retire", T, "v1"],
             ["drop", T, "v1", "--yes"], ["status", T]):
    print("$", args)
    if args == "search":
        exec(SEARCH)
        continue
    if args == "check":
        print([(m.id, m.msg) for m in check_adopted_model_fields()])
        continue
    try:
        call_command("embeddings", *args)
    except CommandError as exc:
        print("CommandError:", exc)
"""

def run(app: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{app}{os.pathsep}{ROOT}",
           "DJANGO_SETTINGS_MODULE": "usersettings", "DATABASE_URL": database_url(),
           "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    if ok and result.returncode != 0:
        raise AssertionError(f"manage.py {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def shell(app: Path, code: str) -> str:
    script = app / "script.py"
    script.write_text(code)
    return run(app, "shell", "-c", f"exec(open({str(script)!r}).read())").stdout


@pytest.fixture
def user_app(tmp_path: Path):
    (tmp_path / "userapp" / "migrations").mkdir(parents=True)
    (tmp_path / "userapp" / "__init__.py").write_text("")
    (tmp_path / "userapp" / "migrations" / "__init__.py").write_text("")
    (tmp_path / "userapp" / "models.py").write_text(MODELS)
    (tmp_path / "usersettings.py").write_text(textwrap.dedent('''
        from tests.settings import *  # noqa: F403
        INSTALLED_APPS = [*INSTALLED_APPS, "userapp"]  # noqa: F405
    '''))
    yield tmp_path
    with connection.cursor() as cursor:  # the user's table is no model of this process
        cursor.execute("DROP TABLE IF EXISTS userapp_paper CASCADE")  # and its capture triggers
        # The target's change capture (stores.ChangeQueue): its queue and trigger function.
        cursor.execute("DROP TABLE IF EXISTS userapp_paper_embedding__changes")
        cursor.execute("DROP FUNCTION IF EXISTS userapp_paper_embedding__capture()")
        cursor.execute("DELETE FROM django_migrations WHERE app = 'userapp'")


def columns() -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT attname FROM pg_attribute WHERE attrelid = 'userapp_paper'::regclass "
                       "AND attnum > 0 AND NOT attisdropped")
        return {row[0] for row in cursor.fetchall()}


def test_a_vectorfield_adopted_as_v1_migrated_to_v2_then_retired_and_dropped_the_django_way(
        user_app: Path) -> None:
    run(user_app, "makemigrations", "userapp")
    run(user_app, "migrate", "userapp")
    assert "filled 30" in shell(user_app, FILL)

    out = shell(user_app, f"SEARCH = {SEARCH!r}\n{COMMANDS}")
    steps = dict(part.split("\n", 1) for part in out.split("$ ")[1:])
    adopted = steps["['adopt', 'userapp.Paper.embedding', 'v1', '--model', 'minilm', '--column', "
                    "'vector', '--inline']"]
    assert "Sample check passed: 25 sampled rows re-embedded: min cosine " in adopted
    assert float(adopted.split("min cosine ")[1].split(",")[0]) >= 0.999
    assert "Adopted 25 vectors of column vector of table userapp_paper" in adopted
    assert "Backfill of userapp.Paper.embedding@v1 done: 5 embedded, 0 empty, 25 already fresh" \
        in adopted  # only the 5 rows the user never embedded
    assert steps["check"].strip() == str([(
        "embeddings.W130", "userapp.Paper.embedding@v1 stores its vectors in the field "
        "userapp.Paper.vector of your model: save() writes it with the value loaded into the "
        "instance.")])
    assert "verify PASSED" in steps["['verify', 'userapp.Paper.embedding', 'v1']"]
    first, second = out.split("$ search\n")[1:3]
    assert "'v1')" in first.split("\n")[0] and "'v2')" not in first.split("\n")[0]
    assert "'v2')" in second.split("\n")[0]
    assert "userapp.Paper.embedding: reads now use v2" in out
    refused = steps["['drop', 'userapp.Paper.embedding', 'v1', '--yes']"]
    assert refused.strip() == (
        "CommandError: userapp.Paper.embedding@v1's vectors are column vector of table "
        "userapp_paper, the field userapp.Paper.vector of your model: dropping it here would "
        "break the model. Remove the field vector from userapp.Paper, run `manage.py "
        "makemigrations userapp` and `manage.py migrate userapp` (Django drops the column), then "
        "run `manage.py embeddings drop userapp.Paper.embedding v1` again to drop "
        "embedding_v1_source_hash.")
    assert {"vector", "embedding_v1_source_hash", "embedding_v2"} <= columns()  # nothing dropped
    status = steps["['status', 'userapp.Paper.embedding']"]
    assert "retired" in status and "active" in status

    # The user follows the steps: the field goes from the model, Django drops the column.
    models_py = user_app / "userapp" / "models.py"
    models_py.write_text(models_py.read_text().replace(
        "    vector = VectorField(dimensions=384, null=True, blank=True)  # filled by the user's "
        "own code\n", "").replace("from pgvector.django import VectorField\n", ""))
    made = run(user_app, "makemigrations", "userapp").stdout
    assert "Remove field vector from paper" in made
    run(user_app, "migrate", "userapp")
    assert "vector" not in columns()

    out = shell(user_app, f'from django.core.management import call_command\n'
                          f'call_command("embeddings", "drop", "{TARGET}", "v1", "--yes")\n{SEARCH}'
                          "from embeddings_app.checks import check_adopted_model_fields\n"
                          "print('W130', check_adopted_model_fields())\n")
    assert "W130 []" in out  # no version of the app's is a field of the model any more
    assert "userapp.Paper.embedding@v1 dropped: columns vector and embedding_v1_source_hash" in out
    assert not {c for c in columns() if c.startswith("embedding_v1")}
    assert {"embedding_v2", "embedding_v2_source_hash"} <= columns()
    assert "'v2')" in out.split("hits")[1]  # the model still works, and so do searches
    with connection.cursor() as cursor:  # what the fixture's teardown removes
        cursor.execute("SELECT to_regclass('userapp_paper_embedding__changes') IS NOT NULL")
        assert cursor.fetchone()[0]
