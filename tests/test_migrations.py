"""The app's migrations match its models on the Django that runs the suite (5.2 in .venv, 6.1 in
.venv-django6): a Django whose autodetector sees the models differently would make the user's
``makemigrations`` write a migration into the installed app."""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command


def test_makemigrations_finds_nothing_to_write_for_the_app(db: None) -> None:
    out = io.StringIO()
    try:
        call_command("makemigrations", "embeddings_app", "--check", "--dry-run", stdout=out)
    except SystemExit as exit:  # --check exits 1 when a migration would be written
        pytest.fail(f"makemigrations would write a migration (exit {exit.code}):\n{out.getvalue()}")
    assert "No changes detected" in out.getvalue()


def test_every_migration_of_the_app_is_applied_to_the_test_database(db: None) -> None:
    out = io.StringIO()
    call_command("showmigrations", "embeddings_app", stdout=out)
    lines = [line.strip() for line in out.getvalue().splitlines()[1:] if line.strip()]
    assert lines and all(line.startswith("[X]") for line in lines), out.getvalue()
