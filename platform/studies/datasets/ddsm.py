"""Two small DDSM film sets → Secondary Capture MG DICOM + findings.

Both are scanned screen films from the Digital Database for Screening Mammography,
staged from different derivatives (see each folder's PROVENANCE.md):

- `ddsm-normals-tissue/` (`read_normals`): 47 normal right-MLO films, one per woman,
  cropped to the breast, resized to 480 × 960 and mirrored (chest wall on the left) by
  the source authors; each with a tissue label map. One Finding "normal" per film,
  with age and ACR density; the tissue map's path is kept in the finding's attributes.
- `mini-ddsm-benign-sample/` (`read_mini_ddsm`): the four views of benign cases as
  Mini-DDSM's lossy 8-bit JPEGs at half the scan's resolution. The JPEG is stored as
  it is, encapsulated (JPEG Baseline transfer syntax): re-encoding would lose more.
  Each DDSM outline is a Finding with its box; the other breast is "normal". Study
  date, age and density come from the case's DDSM `.ics` header.

The two were preprocessed differently: do not pool them as one normal-vs-abnormal
set, or a model learns the source. Each gets its own cohort.

A DDSM case is one woman, so both readers name patients the same way
(`DDSM-<case>`, issuer DDSM): a woman in both sets would be one patient.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
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
    jpeg_image_dataset,
    read_csv,
)

NORMALS_NAME = "ddsm-normals-tissue"
NORMALS_FOLDER = "ddsm-normals-tissue"
# Required columns; age, acr_density, tissue_mask, label_source and source_split are
# read when present.
NORMALS_COLUMNS = ("image", "patient_id", "ddsm_image_id", "laterality", "view", "label")
# No dates come with the normals; DDSM's release year keeps the bytes reproducible and
# files the films as old priors, not as new arrivals.
NORMALS_STUDY_DATE = "19990101"

MINI_NAME = "mini-ddsm-benign"
MINI_FOLDER = "mini-ddsm-benign-sample"
# Required columns; age, acr_density, width and original_width are read when present.
MINI_IMAGE_COLUMNS = ("image", "patient_id", "ddsm_image_id", "laterality", "view", "label")
LESION_COLUMNS = (
    "image",
    "abnormality",
    "outline_kind",
    "lesion_type",
    "lesion_description",
    "pathology",
    "assessment",
    "subtlety",
    "bbox_x0",
    "bbox_y0",
    "bbox_x1",
    "bbox_y1",
)
PATHOLOGY = {"benign": BENIGN, "benign_without_callback": BENIGN, "malignant": MALIGNANT}
LABEL_PATHOLOGY = {NORMAL: NORMAL, **PATHOLOGY}  # an image's label in labels.csv
ISSUER = "DDSM"


# --- ddsm-normals-tissue -------------------------------------------------------------------


def read_normals(path: Path, *, limit: int | None = None) -> Conversion:
    """Open the DDSM normals folder (or the datasets root holding `ddsm-normals-tissue/`)."""
    root = find_root(path, NORMALS_FOLDER, "labels.csv")
    rows = read_csv(root / "labels.csv", NORMALS_COLUMNS)
    if limit is not None:
        rows = rows[:limit]
    return Conversion(
        dataset=NORMALS_NAME,
        description=(
            "DDSM normal right-MLO films, cropped, resized to 480×960 and mirrored by Tiryaki & Kaplanoğlu 2022, "
            "with tissue maps; research use only"
        ),
        total=len(rows),
        items=(_normal_item(root, row) for row in rows),
        notes=["films are mirrored by the source (chest wall on the left) and carry no dates"],
    )


def _normal_item(root: Path, row: dict[str, str]) -> Item:
    name = row["ddsm_image_id"] or row["image"]
    try:
        with Image.open(root / row["image"]) as image:
            pixels = np.asarray(image.convert("L"))
    except OSError as exc:
        return Item(name=name, dicom=None, problem=f"cannot read {row['image']}: {exc}")
    laterality, view = row["laterality"].upper(), row["view"].upper()
    ds = image_dataset(
        pixels,
        **_uids(NORMALS_NAME, row["patient_id"], name),
        **_patient_and_study(row["patient_id"], row.get("age", "")),
        StudyDate=NORMALS_STUDY_DATE,
        ContentDate=NORMALS_STUDY_DATE,
        StudyDescription="DDSM normal mammogram (digitised film, cropped and mirrored)",
        SeriesNumber=1,
        SeriesDescription=f"{laterality} {view} {name} (mirrored)",
        ImageComments="Cropped to the breast, resized to 480x960 and mirrored by the source (chest wall left)",
        **_film(laterality, view),
    )
    finding = FindingSpec(
        source_key=f"{NORMALS_NAME}:{name}",
        pathology=LABEL_PATHOLOGY.get(row["label"].lower(), UNKNOWN),
        attributes={
            "age": _int(row.get("age", "")),
            "acr_density": _int(row.get("acr_density", "")),
            "label_source": row.get("label_source", ""),
            "source_split": row.get("source_split", ""),
            "tissue_mask": row.get("tissue_mask", ""),
            "mirrored": True,
        },
    )
    return Item(name=name, dicom=encode(ds), findings=[finding])


# --- mini-ddsm-benign-sample ---------------------------------------------------------------


def read_mini_ddsm(path: Path, *, limit: int | None = None) -> Conversion:
    """Open the Mini-DDSM sample folder (or the datasets root holding `mini-ddsm-benign-sample/`)."""
    root = find_root(path, MINI_FOLDER, "lesions.csv")
    images = read_csv(root / "labels.csv", MINI_IMAGE_COLUMNS)
    outlines = group_rows(read_csv(root / "lesions.csv", LESION_COLUMNS), "image")
    if limit is not None:
        images = images[:limit]
    return Conversion(
        dataset=MINI_NAME,
        description="Mini-DDSM benign cases (DDSM, Heath et al. 2001; Lekamlage et al. 2020), research use only",
        total=len(images),
        items=_mini_items(root, images, outlines),
    )


def _mini_items(root: Path, images: list[dict[str, str]], outlines: dict[str, list[dict[str, str]]]) -> Iterator[Item]:
    headers: dict[str, dict[str, str]] = {}  # one .ics per case, read once for its four views
    for row in images:
        case = row["patient_id"]
        if case not in headers:
            headers[case] = _ics_header(root, case)
        yield _mini_item(root, row, outlines[row["image"]], headers[case])


def _mini_item(root: Path, row: dict[str, str], outlines: list[dict[str, str]], header: dict[str, str]) -> Item:
    name = row["ddsm_image_id"] or row["image"]
    path = root / row["image"]
    try:
        jpeg = path.read_bytes()
    except OSError as exc:
        return Item(name=name, dicom=None, problem=f"cannot read {row['image']}: {exc}")
    laterality, view = row["laterality"].upper(), row["view"].upper()
    study_date = header.get("study_date", "")
    try:
        ds = jpeg_image_dataset(
            jpeg,
            **_uids(MINI_NAME, row["patient_id"], name),
            **_patient_and_study(row["patient_id"], row.get("age") or header.get("age", "")),
            StudyDate=study_date,
            ContentDate=study_date,
            StudyDescription="DDSM mammograms (digitised film, Mini-DDSM JPEG)",
            SeriesNumber=SERIES_NUMBER.get((laterality, view), 9),
            SeriesDescription=f"{laterality} {view} {name}",
            **_film(laterality, view),
            **_spacing(row, header),
        )
    except ValueError as exc:
        return Item(name=name, dicom=None, problem=f"{row['image']}: {exc}")
    width, height = int(ds.Columns), int(ds.Rows)
    common = {"age": _int(row.get("age", "")), "acr_density": _int(row.get("acr_density", ""))}
    if header.get("digitizer"):
        common["digitizer"] = header["digitizer"]
    findings = _lesion_findings(name, outlines, width, height, common)
    if not findings:  # a normal image, or a lesion without an outline: its label, no box
        pathology = LABEL_PATHOLOGY.get(row["label"].lower(), UNKNOWN)
        findings = [FindingSpec(source_key=f"{MINI_NAME}:{name}", pathology=pathology, attributes=common)]
    return Item(name=name, dicom=encode(ds), findings=findings)


# DDSM reads four views per case: one series each, in the usual hanging order.
SERIES_NUMBER = {("R", "CC"): 1, ("L", "CC"): 2, ("R", "MLO"): 3, ("L", "MLO"): 4}


def _lesion_findings(
    name: str, outlines: list[dict[str, str]], width: int, height: int, common: dict[str, object]
) -> list[FindingSpec]:
    """One finding per DDSM abnormality: its BOUNDARY outline's box (inclusive pixel
    bounds, so x1/y1 + 1); CORE outlines of the same abnormality go in its attributes."""
    findings = []
    for number, rows in group_rows(outlines, "abnormality").items():
        rows.sort(key=lambda r: r["outline_kind"].upper() != "BOUNDARY")  # the boundary first
        main, cores = rows[0], rows[1:]
        box = clip_box(*_inclusive_box(main), width, height)
        attributes = common | {
            "birads": _int(main["assessment"]),
            "subtlety": _int(main["subtlety"]),
            "lesion_description": main["lesion_description"],
            "outline_kind": main["outline_kind"],
        }
        if cores:
            attributes["core_boxes"] = [list(_inclusive_box(core)) for core in cores]
        findings.append(
            FindingSpec(
                source_key=f"{MINI_NAME}:{name}:{number}",
                pathology=PATHOLOGY.get(main["pathology"].lower(), UNKNOWN),
                abnormality_class=main["lesion_type"].lower(),
                box=box,
                attributes=attributes,
            )
        )
    return findings


def _inclusive_box(row: dict[str, str]) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (float(row[c]) for c in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"))
    return (x0, y0, x1 + 1, y1 + 1)


def _ics_header(root: Path, patient: str) -> dict[str, str]:
    """Study date (DICOM DA), age and digitiser from the case's DDSM `.ics` file, when
    there is one (`ddsm_truth/<case number>/*.ics`). DDSM writes dates as day month year."""
    folder = root / "ddsm_truth" / patient.rsplit("_", 1)[-1]
    header: dict[str, str] = {}
    for ics in sorted(folder.glob("*.ics")):
        for line in ics.read_text(encoding="latin-1").splitlines():
            key, _, value = line.strip().partition(" ")
            if key == "DATE_OF_STUDY":
                header["study_date"] = _ddsm_date(value)
            elif key == "PATIENT_AGE":
                header["age"] = value.strip()
            elif key == "DIGITIZER":
                header["digitizer"] = value.strip()
            elif match := re.search(r"\bRESOLUTION (\d+)", line):  # per view; the same for a case
                header["resolution_um"] = match.group(1)
    return header


def _ddsm_date(text: str) -> str:
    try:
        day, month, year = (int(part) for part in text.split())
        return dt.date(year, month, day).strftime("%Y%m%d")
    except ValueError:
        return ""


def _spacing(row: dict[str, str], header: dict[str, str]) -> dict[str, object]:
    """Pixel spacing of the JPEG: the scan's resolution times the downsampling, when known."""
    try:
        scale = float(row["original_width"]) / float(row["width"])
        spacing = round(float(header["resolution_um"]) / 1000 * scale, 4)
    except (KeyError, ValueError, ZeroDivisionError):
        return {}
    return {"NominalScannedPixelSpacing": [spacing, spacing], "PixelSpacing": [spacing, spacing]}


# --- shared --------------------------------------------------------------------------------


def _uids(dataset: str, case: str, image: str) -> dict[str, str]:
    """One study per DDSM case, one series per film."""
    return {
        "sop_class_uid": SECONDARY_CAPTURE,
        "sop_instance_uid": dataset_uid(dataset, "instance", image),
        "study_instance_uid": dataset_uid(dataset, "study", case),
        "series_instance_uid": dataset_uid(dataset, "series", image),
    }


def _patient_and_study(case: str, age: str) -> dict[str, object]:
    age_value = _int(age)
    return {
        "PatientID": f"DDSM-{case}",
        "IssuerOfPatientID": ISSUER,
        "PatientName": f"DDSM^{case}",
        "PatientSex": "F",
        "PatientBirthDate": "",
        "PatientAge": f"{age_value:03d}Y" if age_value is not None else "",
        "StudyTime": "",
        "StudyID": case,
        "AccessionNumber": "",
        "ReferringPhysicianName": "",
    }


def _film(laterality: str, view: str) -> dict[str, object]:
    """What every digitised mammography film here has in common."""
    return {
        "Modality": "MG",
        "ConversionType": "DF",
        "SecondaryCaptureDeviceManufacturer": "Precedent",
        "InstanceNumber": 1,
        "ImageType": ["DERIVED", "SECONDARY"],
        "PatientOrientation": "",
        "BodyPartExamined": "BREAST",
        "ImageLaterality": laterality,
        "ViewPosition": view,
        "BurnedInAnnotation": "YES",  # film labels can be visible in DDSM scans
        "WindowCenter": 128,
        "WindowWidth": 256,
    }


def _int(text: str) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None
