"""python manage.py encoder list | register PATH [--name N] | activate NAME [--wait]."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Count, Q

from embeddings import encoder as enc
from embeddings import services
from embeddings.models import EncoderVersion


class Command(BaseCommand):
    help = "List encoder versions, register a weights file, or activate a version."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        sub.add_parser("list")
        register = sub.add_parser("register", help="a weights file written by train_encoder (or save_encoder)")
        register.add_argument("path", type=Path)
        register.add_argument("--name", default="")
        activate = sub.add_parser("activate", help="embed the archive with it, then serve it")
        activate.add_argument("name")
        activate.add_argument("--wait", action="store_true", help="do the embedding now instead of in the background")

    def handle(self, *args: Any, action: str, **options: Any) -> None:
        if action == "register":
            try:
                version = services.encoder_register(path=options["path"], name=options["name"])
            except FileNotFoundError:
                raise CommandError(f"no such file: {options['path']}") from None
            except (enc.EncoderFileError, ValueError) as exc:
                raise CommandError(str(exc)) from None
            self.stdout.write(f"registered {version.name} ({version.architecture}, {version.dim} dims)")
        elif action == "activate":
            version = EncoderVersion.objects.filter(name=options["name"]).first()
            if version is None:
                raise CommandError(f"no encoder version named {options['name']!r}")
            services.encoder_activate(encoder=version, wait=options["wait"])
            version.refresh_from_db()
            self.stdout.write(f"{version.name}: {version.get_status_display()}")
        versions = EncoderVersion.objects.annotate(
            images=Count("embeddings", filter=Q(embeddings__kind="image")),
            regions=Count("embeddings", filter=Q(embeddings__kind="region")),
        )
        for v in versions:
            metrics = v.metadata.get("metrics") or {}
            extra = ", ".join(f"{k} {val:.3f}" for k, val in metrics.items() if isinstance(val, float))
            self.stdout.write(
                f"{v.name:40} {v.status:10} {v.architecture:12} d={v.dim:<4} {v.images} images, "
                f"{v.regions} regions; cohort {v.metadata.get('cohort') or '-'}{'; ' + extra if extra else ''}"
            )
