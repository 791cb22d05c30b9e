"""python manage.py import_dataset {mias,cbis,nih-cxr,ddsm-normals,mini-ddsm,synthetic} [PATH] [--cohort NAME] ..."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.core.validators import validate_slug

from precedent.commands import quiet_per_item_logs
from studies.datasets import FOLDER_DATASETS, SYNTHETIC, SYNTHETIC_COHORT, DatasetError, synthetic
from studies.datasets.base import Conversion
from studies.datasets.importer import ImportSummary, import_conversion


class Command(BaseCommand):
    help = (
        "Import a public dataset with its ground truth, or generate synthetic mammograms. "
        "Every image is converted to DICOM (or taken as is) and stored through the normal ingest; "
        "its labels become Findings and its studies join a cohort. Importing again reports duplicates. "
        "mias: mini-MIAS folder (images.csv, annotations.csv); cbis: CBIS-DDSM samples folder (labels.csv); "
        "nih-cxr: NIH ChestX-ray14 box subset folder (images.csv, boxes.csv, Data_Entry_2017_subset.csv); "
        "ddsm-normals: DDSM normals with tissue maps (labels.csv); "
        "mini-ddsm: Mini-DDSM benign cases (labels.csv, lesions.csv, ddsm_truth/). "
        "PATH may also be the folder that holds these datasets. "
        "synthetic: no PATH; --patients N × 4 views of phantom mammograms drawn from --seed."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("dataset", choices=[*FOLDER_DATASETS, SYNTHETIC])
        parser.add_argument("path", nargs="?", type=Path, help="dataset folder (not for synthetic)")
        parser.add_argument(
            "--cohort",
            help=f"cohort to add the studies to (default: the dataset name; synthetic: {SYNTHETIC_COHORT})",
        )
        parser.add_argument("--limit", type=_positive, help="import only the first N images")
        parser.add_argument(
            "--patients",
            type=_positive,
            help=f"synthetic: number of patients (default {synthetic.DEFAULT_PATIENTS})",
        )
        parser.add_argument(
            "--seed", type=_non_negative, help=f"synthetic: random seed (default {synthetic.DEFAULT_SEED})"
        )

    @quiet_per_item_logs
    def handle(self, *args: Any, **options: Any) -> None:
        conversion, default_cohort = self._open(options)
        cohort = options["cohort"] or default_cohort
        try:
            validate_slug(cohort)
        except ValidationError:
            raise CommandError(f"--cohort {cohort!r}: use letters, digits, '-' and '_' only")
        summary = import_conversion(conversion, cohort=cohort)
        report(self, summary)

    def _open(self, options: dict[str, Any]) -> tuple[Conversion, str]:
        name, path, limit = options["dataset"], options["path"], options["limit"]
        if name == SYNTHETIC:
            if path is not None:
                raise CommandError("synthetic takes no PATH")
            patients = options["patients"] or synthetic.DEFAULT_PATIENTS
            seed = synthetic.DEFAULT_SEED if options["seed"] is None else options["seed"]
            return synthetic.read(patients=patients, seed=seed, limit=limit), SYNTHETIC_COHORT
        if options["patients"] is not None or options["seed"] is not None:
            raise CommandError("--patients and --seed apply to synthetic only")
        if path is None:
            raise CommandError(f"{name} needs the PATH of its dataset folder")
        reader, default_cohort, _folder = FOLDER_DATASETS[name]
        try:
            return reader(path.expanduser(), limit=limit), default_cohort
        except DatasetError as exc:
            raise CommandError(str(exc))


def report(command: BaseCommand, summary: ImportSummary) -> None:
    """The summary line, then rejection reasons and notes (shared with load_demo)."""
    command.stdout.write(summary.line())
    for line in summary.detail_lines():
        command.stdout.write(line)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def _non_negative(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 0, got {text!r}")
    return int(text)
