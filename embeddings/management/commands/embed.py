"""python manage.py embed --pending | --all [--encoder NAME]."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from embeddings import services
from embeddings.models import Embedding, EncoderVersion


class Command(BaseCommand):
    help = "Embed the archive with an encoder (default: the active one, and one being activated)."

    def add_arguments(self, parser: CommandParser) -> None:
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("--pending", action="store_true", help="only images and boxes not embedded yet")
        which.add_argument(
            "--all", action="store_true", help="embed everything again (each batch's new vectors replace its old ones)"
        )
        parser.add_argument("--encoder", default="", help="encoder version name")
        parser.add_argument("--batch-size", type=int, default=16, help="images per model call (default 16)")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["batch_size"] < 1:
            raise CommandError("--batch-size must be at least 1")
        if options["encoder"]:
            encoders = list(EncoderVersion.objects.filter(name=options["encoder"]))
            if not encoders:
                raise CommandError(f"no encoder version named {options['encoder']!r}")
        else:
            encoders = services.embedding_encoders()
            if not encoders:
                raise CommandError("no active encoder: train one (train_encoder) or activate one (encoder activate)")
        for encoder in encoders:
            # --all replaces a batch's vectors in one transaction: search keeps serving
            # the old ones until then, and an interrupted run leaves none missing.
            with tqdm(desc=f"embed {encoder.name}", unit="img", disable=options["verbosity"] == 0) as bar:

                def progress(done: int, total: int) -> None:
                    bar.total = total
                    bar.update(done - bar.n)

                report = services.embed_pending(
                    encoder=encoder, batch_size=options["batch_size"], progress=progress, replace=options["all"]
                )
            for kind in Embedding.Kind.values:
                services.serving_index(encoder, kind, save=True)
            self.stdout.write(
                f"{encoder.name}: {report.images} images and {report.regions} regions embedded, "
                f"{len(report.failed)} could not be decoded"
            )
            for instance_id, reason in report.failed.items():
                self.stdout.write(f"  instance {instance_id}: {reason}")
