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
        which.add_argument("--all", action="store_true", help="embed everything again (replaces the vectors)")
        parser.add_argument("--encoder", default="", help="encoder version name")
        parser.add_argument("--batch-size", type=int, default=16)

    def handle(self, *args: Any, **options: Any) -> None:
        if options["encoder"]:
            encoders = list(EncoderVersion.objects.filter(name=options["encoder"]))
            if not encoders:
                raise CommandError(f"no encoder version named {options['encoder']!r}")
        else:
            encoders = services.embedding_encoders()
            if not encoders:
                raise CommandError("no active encoder: train one (train_encoder) or activate one (encoder activate)")
        for encoder in encoders:
            if options["all"]:
                # One by one, so each leaves a tombstone for the indexes of other processes.
                for embedding in Embedding.objects.filter(encoder=encoder).iterator():
                    embedding.delete()
            pending = services.pending_instances(encoder).count()
            with tqdm(
                total=pending, desc=f"embed {encoder.name}", unit="img", disable=options["verbosity"] == 0
            ) as bar:
                report = services.embed_pending(
                    encoder=encoder,
                    batch_size=options["batch_size"],
                    progress=lambda done, total: bar.update(done - bar.n),
                )
            for kind in Embedding.Kind.values:
                services.serving_index(encoder, kind, save=True)
            self.stdout.write(
                f"{encoder.name}: {report.images} images and {report.regions} regions embedded, "
                f"{len(report.failed)} could not be decoded"
            )
            for instance_id, reason in report.failed.items():
                self.stdout.write(f"  instance {instance_id}: {reason}")
