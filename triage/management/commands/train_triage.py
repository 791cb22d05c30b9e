"""python manage.py train_triage --cohort NAME [--model classifier|detector|segmenter|all]."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from studies.models import Cohort
from triage import services
from triage.models import TriageModelVersion

# --model → the service that trains it; each has the same keyword signature
# (cohort, epochs, device, seed, name, activate, progress) and returns a TriageModelVersion.
TRAINERS = {
    "classifier": "train_classifier",
    "detector": "train_detector",
    "segmenter": "train_segmenter",
}


class Command(BaseCommand):
    help = (
        "Train triage models on a cohort's labelled images (studies.Finding rows) and register them as "
        "triage model versions: the mammogram classifier, the lesion detector, the segmenter, or all three."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--cohort", required=True)
        parser.add_argument("--model", choices=[*TRAINERS, "all"], default="classifier")
        parser.add_argument("--epochs", type=int, default=None, help="default: each model's own")
        parser.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: CUDA when present)")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--name", default="", help="version name (one model only; default: kind, date, hash)")
        parser.add_argument("--activate", action="store_true", help="score new studies with it")
        parser.add_argument(
            "--weights",
            type=Path,
            default=None,
            help="classifier and detector: start the backbone from this checkpoint (a torchvision/encoder/triage file)",
        )
        parser.add_argument(
            "--init-from-encoder",
            action="store_true",
            help="classifier and detector: start the backbone from the active search encoder (transfer learning)",
        )
        parser.add_argument("--input-size", type=int, default=None, help="long side in pixels (default: each model's)")
        parser.add_argument("--batch-size", type=int, default=None, help="default: each model's")
        parser.add_argument(
            "--crop", type=int, default=None, help="detector and segmenter: train on crop×crop windows of the film"
        )
        parser.add_argument(
            "--breast-crop",
            action="store_true",
            help="detector: frame each film by its breast region, no background or label to mark (mammograms only; "
            "default off)",
        )
        parser.add_argument(
            "--max-minutes",
            type=float,
            default=None,
            help="stop after this much training, the learning-rate schedule shortened to fit",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        cohort = Cohort.objects.filter(name=options["cohort"]).first()
        if cohort is None:
            raise CommandError(f"no cohort named {options['cohort']!r}")
        if options["epochs"] is not None and options["epochs"] < 1:
            raise CommandError("--epochs must be at least 1")
        kinds = list(TRAINERS) if options["model"] == "all" else [options["model"]]
        if options["name"] and len(kinds) > 1:
            raise CommandError("--name names one model; leave it out with --model all")
        if options["name"] and TriageModelVersion.objects.filter(name=options["name"]).exists():
            raise CommandError(f"a triage model named {options['name']!r} exists already: choose another --name")
        if options["weights"] is not None and not options["weights"].is_file():
            raise CommandError(f"--weights {options['weights']} is not a file")
        if options["max_minutes"] is not None and options["max_minutes"] <= 0:
            raise CommandError("--max-minutes must be positive")
        common = {key: options[key] for key in ("input_size", "batch_size") if options[key] is not None}
        if options["max_minutes"] is not None:
            common["max_seconds"] = options["max_minutes"] * 60
        only = {
            "transfer": {key: options[key] for key in ("weights", "init_from_encoder") if options[key]},
            "localiser": {"crop": options["crop"]} if options["crop"] is not None else {},
            "detector": {"breast_crop": True} if options["breast_crop"] else {},
        }
        groups = (
            ("transfer", {"classifier", "detector"}),
            ("localiser", {"detector", "segmenter"}),
            ("detector", {"detector"}),
        )
        for group, applies in groups:
            if only[group] and not applies & set(kinds):
                flag = next(iter(only[group]))
                raise CommandError(f"--{flag.replace('_', '-')} applies to the {' and '.join(sorted(applies))} only")
        for kind in kinds:
            trainer = getattr(services, TRAINERS[kind], None)
            if trainer is None:
                raise CommandError(f"training a {kind} is not available in this version")
            try:
                version = trainer(
                    cohort=cohort,
                    epochs=options["epochs"],
                    device=options["device"],
                    seed=options["seed"],
                    name=options["name"],
                    activate=options["activate"],
                    progress=options["verbosity"] > 0,
                    **common,
                    **(only["transfer"] if kind in ("classifier", "detector") else {}),
                    **(only["localiser"] if kind != "classifier" else {}),
                    **(only["detector"] if kind == "detector" else {}),
                )
            except ValueError as exc:  # ModelFileError and bad cohorts are ValueErrors with one-line reasons
                raise CommandError(f"{kind}: {exc}") from None
            summary = version.metadata.get("training", {}).get("summary", "")
            state = "active" if version.status == version.Status.ACTIVE else "not active (use --activate)"
            self.stdout.write(f"{kind} {version.name} registered, {state}" + (f": {summary}" if summary else ""))
