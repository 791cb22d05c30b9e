"""Public datasets and synthetic phantoms, converted to DICOM with their ground truth.

The readers (`mias`, `cbis`, `nih_cxr`, `ddsm`, `synthetic`, built on `phantoms`) import no
Django: each turns a folder (or a seed) into `base.Item`s. `importer` is the Django
side that feeds them through the ingest service and stores findings and cohorts.
"""

from __future__ import annotations

from collections.abc import Callable

from . import cbis, ddsm, mias, nih_cxr
from .base import Conversion, DatasetError

# Command-line name → (reader, default cohort, folder name under the shared datasets).
FOLDER_DATASETS: dict[str, tuple[Callable[..., Conversion], str, str]] = {
    "mias": (mias.read, "mias", mias.FOLDER),
    "cbis": (cbis.read, "cbis", cbis.FOLDER),
    "nih-cxr": (nih_cxr.read, "nih-cxr", nih_cxr.FOLDER),
    "ddsm-normals": (ddsm.read_normals, "ddsm-normals", ddsm.NORMALS_FOLDER),
    "mini-ddsm": (ddsm.read_mini_ddsm, "mini-ddsm", ddsm.MINI_FOLDER),
}
SYNTHETIC = "synthetic"
SYNTHETIC_COHORT = "synthetic-screening"

__all__ = ["FOLDER_DATASETS", "SYNTHETIC", "SYNTHETIC_COHORT", "Conversion", "DatasetError"]
