"""python manage.py train_encoder --cohort NAME: self-supervised (+ supervised) training."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from embeddings import encoder as enc  # noqa: I001 - after services, which imports faiss first
from embeddings import services, training
from embeddings.models import EncoderVersion
from embeddings.selectors import LABELS, cohort_images
from studies.errors import RenderError
from studies.models import Cohort


class Command(BaseCommand):
    help = (
        "Train an encoder on a cohort's images: contrastive (SimCLR) learning with radiograph augmentations, "
        "plus a supervised term where findings give labels. Registers the result as an encoder version."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--cohort", required=True)
        parser.add_argument(
            "--arch", default=training.DEFAULT_ARCH, choices=[a for a in enc.ARCHITECTURES if a != "raw-pixels"]
        )
        parser.add_argument("--epochs", type=int, default=training.DEFAULT_EPOCHS)
        parser.add_argument("--batch-size", type=int, default=training.DEFAULT_BATCH_SIZE)
        parser.add_argument("--input-size", type=int, default=training.DEFAULT_INPUT_SIZE)
        parser.add_argument("--dim", type=int, default=enc.DEFAULT_DIM)
        parser.add_argument("--lr", type=float, default=training.DEFAULT_LR)
        parser.add_argument(
            "--label", choices=[*LABELS, "none"], default="abnormal", help="labels for the supervised term"
        )
        parser.add_argument("--supervised-weight", type=float, default=training.DEFAULT_SUPERVISED_WEIGHT)
        parser.add_argument(
            "--weights", type=Path, help="start the backbone from a torchvision checkpoint (e.g. ImageNet)"
        )
        parser.add_argument("--name", default="", help="encoder version name (default: architecture, size and date)")
        parser.add_argument("--activate", action="store_true", help="serve it once the archive is embedded with it")
        parser.add_argument("--seed", type=int, default=0)

    def handle(self, *args: Any, **options: Any) -> None:
        cohort = options["cohort"]
        if not Cohort.objects.filter(name=cohort).exists():
            raise CommandError(f"no cohort named {cohort!r}")
        if options["weights"] is not None and not options["weights"].is_file():
            raise CommandError(f"--weights {options['weights']} is not a file")
        if options["name"] and EncoderVersion.objects.filter(name=options["name"]).exists():
            raise CommandError(f"an encoder named {options['name']!r} exists already: choose another --name")
        label = options["label"]
        items = cohort_images(cohort, "abnormal" if label == "none" else label)
        if len(items) < 2:
            raise CommandError(f"cohort {cohort!r} has {len(items)} images with pixels; training needs at least 2")

        images, labels, monochrome1 = [], [], []
        for item in tqdm(items, desc="decode", unit="img", disable=options["verbosity"] == 0):
            try:
                picture = services.instance_picture(item.instance, services.representative_frame(item.instance))
            except RenderError as exc:
                self.stderr.write(f"skipped {item.instance.sop_instance_uid}: {exc}")
                continue
            images.append(picture.pixels)
            labels.append(None if label == "none" else item.label)
            monochrome1.append(picture.monochrome1)

        try:
            model, report = training.train(
                images,
                labels,
                arch=options["arch"],
                dim=options["dim"],
                input_size=options["input_size"],
                epochs=options["epochs"],
                batch_size=options["batch_size"],
                lr=options["lr"],
                supervised_weight=options["supervised_weight"] if label != "none" else 0.0,
                monochrome1=monochrome1,
                init_weights=options["weights"],
                progress=options["verbosity"] > 0,
                seed=options["seed"],
            )
        except (ValueError, enc.EncoderFileError) as exc:
            raise CommandError(str(exc)) from None

        name = options["name"] or f"{options['arch']}-d{options['dim']}-{dt.datetime.now():%Y%m%d-%H%M%S}"
        meta = report.training_meta(cohort=cohort)
        meta.settings.update(label=label, images=len(images))
        # Written aside and copied in by the registration, so that no file a version
        # serves from is ever written over.
        incoming = services.models_dir() / f".incoming-{uuid.uuid4().hex}.pt"
        try:
            enc.save_encoder(incoming, model, meta)
            version = services.encoder_register(path=incoming, name=name)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        finally:
            incoming.unlink(missing_ok=True)
        path = services.models_dir() / f"{name}.pt"
        self.stdout.write(
            f"trained {name} on {len(images)} images of {cohort!r} in {report.seconds / 60:.1f} min "
            f"({report.images_per_second:.1f} img/s on {report.device}); loss "
            f"{report.epoch_losses[0]:.3f} → {report.epoch_losses[-1]:.3f}; saved {path}"
        )
        if report.init is not None:
            init = report.init
            self.stdout.write(
                f"backbone from {options['weights']}: {len(init.loaded)} tensors loaded, {len(init.adapted)} adapted "
                f"to one channel, {len(init.missing)} missing (trained from scratch)"
            )
        if options["activate"]:
            services.encoder_activate(encoder=version)
            self.stdout.write(f"{name} will serve search once the archive is embedded with it (background)")
