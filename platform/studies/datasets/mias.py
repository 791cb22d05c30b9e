"""mini-MIAS film mammograms (8-bit PNG, 1024²) → Secondary Capture MG DICOM + findings.

Columns are those of the shared copy's images.csv and annotations.csv (see its
PROVENANCE.md): annotations.csv already holds top-left-origin boxes, the square around
the lesion circle, not clipped to the film. mdb(2k-1) and mdb(2k) are the right and
left breast of one patient, so each patient becomes one study with two images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .base import (
    BENIGN,
    MALIGNANT,
    NORMAL,
    SECONDARY_CAPTURE,
    UNKNOWN,
    Conversion,
    FindingSpec,
    Item,
    clip_box,
    dataset_uid,
    encode,
    find_root,
    group_rows,
    image_dataset,
    read_csv,
)

NAME = "mini-mias"
FOLDER = "mini-mias"
IMAGE_COLUMNS = ("refnum", "file", "patient_id", "laterality")
ANNOTATION_COLUMNS = (
    "refnum",
    "background_tissue",
    "abnormality_class",
    "severity",
    "radius",
    "x_img",
    "y_img",
    "bbox_x0",
    "bbox_y0",
    "bbox_x1",
    "bbox_y1",
    "note",
)
SEVERITY = {"B": BENIGN, "M": MALIGNANT}
# No acquisition dates survive in MIAS; a fixed date (the year of its release) keeps
# the bytes reproducible and files the films as old priors, not as new arrivals.
STUDY_DATE = "19940101"
PIXEL_SPACING_MM = 0.2  # 50 µm scans reduced to a 200 µm pixel edge (Info.txt)


def read(path: Path, *, limit: int | None = None) -> Conversion:
    """Open a mini-MIAS folder (or the datasets root holding `mini-mias/`)."""
    root = find_root(path, FOLDER, "images.csv")
    images = read_csv(root / "images.csv", IMAGE_COLUMNS)
    annotations = group_rows(read_csv(root / "annotations.csv", ANNOTATION_COLUMNS), "refnum")
    if limit is not None:
        images = images[:limit]
    return Conversion(
        dataset=NAME,
        description="mini-MIAS film mammograms (Suckling et al. 1994), research use only",
        total=len(images),
        items=(_item(root, row, annotations[row["refnum"]]) for row in images),
    )


def _item(root: Path, row: dict[str, str], annotations: list[dict[str, str]]) -> Item:
    refnum = row["refnum"]
    try:
        with Image.open(root / row["file"]) as image:
            pixels = np.asarray(image.convert("L"))
    except OSError as exc:
        return Item(name=refnum, dicom=None, problem=f"cannot read {row['file']}: {exc}")
    height, width = pixels.shape
    return Item(
        name=refnum,
        dicom=encode(_dataset(pixels, refnum, row["patient_id"], row["laterality"].upper())),
        findings=[_finding(refnum, index, ann, width, height) for index, ann in enumerate(annotations)],
    )


def _dataset(pixels: np.ndarray, refnum: str, patient: str, laterality: str):
    return image_dataset(
        pixels,
        sop_class_uid=SECONDARY_CAPTURE,
        sop_instance_uid=dataset_uid(NAME, "instance", refnum),
        study_instance_uid=dataset_uid(NAME, "study", patient),
        series_instance_uid=dataset_uid(NAME, "series", refnum),
        PatientID=f"MIAS-{patient}",
        IssuerOfPatientID="MIAS",
        PatientName=f"MIAS^{patient}",
        PatientSex="",
        PatientBirthDate="",
        StudyDate=STUDY_DATE,
        StudyTime="",
        StudyID=patient,
        AccessionNumber="",
        ReferringPhysicianName="",
        StudyDescription="MIAS mammograms (digitised film)",
        Modality="MG",
        SeriesNumber=1 if laterality == "R" else 2,
        SeriesDescription=f"{laterality} MLO {refnum}",
        ConversionType="DF",
        SecondaryCaptureDeviceManufacturer="Precedent",
        InstanceNumber=1,
        ImageType=["DERIVED", "SECONDARY"],
        PatientOrientation="",
        BodyPartExamined="BREAST",
        ImageLaterality=laterality,
        ViewPosition="MLO",
        ContentDate=STUDY_DATE,
        NominalScannedPixelSpacing=[PIXEL_SPACING_MM, PIXEL_SPACING_MM],
        PixelSpacing=[PIXEL_SPACING_MM, PIXEL_SPACING_MM],
        BurnedInAnnotation="YES",  # the film labels are visible in these scans
        WindowCenter=128,
        WindowWidth=256,
    )


def _finding(refnum: str, index: int, ann: dict[str, str], width: int, height: int) -> FindingSpec:
    key = f"{NAME}:{refnum}:{index}"
    attributes: dict[str, object] = {"background_tissue": ann["background_tissue"]}
    if ann["abnormality_class"] == "NORM":
        return FindingSpec(source_key=key, pathology=NORMAL, attributes=attributes)
    box = None
    if ann["bbox_x0"]:
        square = tuple(float(ann[c]) for c in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"))
        box = clip_box(*square, width, height)
        attributes |= {"radius": float(ann["radius"]), "centre": [float(ann["x_img"]), float(ann["y_img"])]}
        if box != square:
            # The square around the circle can reach past the film; keep what the data said.
            attributes["box_unclipped"] = list(square)
    if ann["note"]:
        attributes["note"] = ann["note"]
    return FindingSpec(
        source_key=key,
        pathology=SEVERITY.get(ann["severity"], UNKNOWN),
        abnormality_class=ann["abnormality_class"],
        box=box,
        attributes=attributes,
    )
