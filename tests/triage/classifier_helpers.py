"""Shared pieces of the classifier tests: a few real MIAS films and a tiny trained model."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from django.core.management import call_command
from PIL import Image

from triage import training

# p001 (mdb001/002: benign masses), p002 (normal), p003 (mdb005 benign, mdb006 normal), p004 (normal).
TINY_LIMIT = "8"


def mias_items(datasets: Path, refnums: list[str]) -> list[training.TrainingItem]:
    root = datasets / "mini-mias"
    with (root / "annotations.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["refnum"] in refnums]
    items = []
    for ref in refnums:
        with Image.open(root / "images" / f"{ref}.png") as image:
            pixels = np.asarray(image.convert("L"))
        mine = [r for r in rows if r["refnum"] == ref]
        abnormal = int(any(r["abnormality_class"] != "NORM" for r in mine))
        boxes = [tuple(float(r[c]) for c in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")) for r in mine if r["bbox_x0"]]
        malignant = 1 if any(r["severity"] == "M" for r in mine) else 0 if abnormal else training.UNKNOWN
        items.append(training.TrainingItem(pixels, abnormal, malignant, boxes, key=ref))
    return items


def import_tiny_cohort(datasets: Path, name: str = "tiny") -> str:
    out = io.StringIO()
    call_command(
        "import_dataset", "mias", str(datasets / "mini-mias"), "--limit", TINY_LIMIT, "--cohort", name, stdout=out
    )
    return out.getvalue()
