"""NIH ChestX-ray14 box subset (8-bit PNG, 1024²) → Secondary Capture DX DICOM + findings.

Per the folder's PROVENANCE.md: boxes.csv holds radiologist boxes as x, y, w, h with a
top-left origin; Data_Entry_2017_subset.csv holds NIH's NLP-mined image-level labels,
follow-up number, age, sex and view. One NIH patient id is one patient; each image is
one visit (its follow-up number), so one study.

Box findings and image-level labels are both "abnormal, pathology unknown": the
labels name a finding, not whether it is benign. A label that also has a box in the
image is not repeated as a box-less finding. NIH spells one label "Infiltration" in
the labels and "Infiltrate" in the box list; both become "Infiltration" so a class
means one thing across the set.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
from PIL import Image

from .base import (
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

NAME = "nih-cxr14"
FOLDER = "nih-chestxray14-bbox"
IMAGE_COLUMNS = ("image", "file", "patient_id")
BOX_COLUMNS = ("image", "finding", "x", "y", "w", "h")
ENTRY_COLUMNS = ("Image Index", "Finding Labels", "Follow-up #", "Patient Age", "Patient Gender", "View Position")
NO_FINDING = "No Finding"
LABEL_SPELLING = {"Infiltrate": "Infiltration"}
# NIH publishes no dates. Placeholder dates, one day per follow-up number, keep the
# bytes reproducible and the visits of one patient in their real order.
FIRST_VISIT = dt.date(2000, 1, 1)


def read(path: Path, *, limit: int | None = None) -> Conversion:
    """Open the NIH ChestX-ray14 box subset (or the datasets root holding it)."""
    root = find_root(path, FOLDER, "images.csv")
    images = read_csv(root / "images.csv", IMAGE_COLUMNS)
    entries = {row["Image Index"]: row for row in read_csv(root / "Data_Entry_2017_subset.csv", ENTRY_COLUMNS)}
    boxes = group_rows(read_csv(root / "boxes.csv", BOX_COLUMNS), "image")
    if limit is not None:
        images = images[:limit]
    return Conversion(
        dataset=NAME,
        description="NIH ChestX-ray14 images with radiologist boxes (Wang et al. 2017), NIH Clinical Center",
        total=len(images),
        items=(_item(root, row, entries.get(row["image"]), boxes[row["image"]]) for row in images),
    )


def _item(root: Path, row: dict[str, str], entry: dict[str, str] | None, boxes: list[dict[str, str]]) -> Item:
    image_name = row["image"]
    if entry is None:
        return Item(name=image_name, dicom=None, problem="no row in Data_Entry_2017_subset.csv")
    try:
        with Image.open(root / row["file"]) as image:
            # A few NIH PNGs are RGBA; the pixels are grey either way.
            pixels = np.asarray(image.convert("L"))
    except OSError as exc:
        return Item(name=image_name, dicom=None, problem=f"cannot read {row['file']}: {exc}")
    height, width = pixels.shape
    findings = [_box_finding(image_name, index, box, width, height) for index, box in enumerate(boxes)]
    boxed = {f.abnormality_class for f in findings}
    for label in entry["Finding Labels"].split("|"):
        label = LABEL_SPELLING.get(label.strip(), label.strip())
        if label == NO_FINDING:
            findings.append(FindingSpec(source_key=f"{NAME}:{image_name}:normal", pathology=NORMAL))
        elif label and label not in boxed:
            findings.append(
                FindingSpec(
                    source_key=f"{NAME}:{image_name}:label:{label}",
                    pathology=UNKNOWN,
                    abnormality_class=label,
                    attributes={"label_source": "report NLP (image level)"},
                )
            )
    return Item(
        name=image_name, dicom=encode(_dataset(pixels, image_name, row["patient_id"], entry)), findings=findings
    )


def _box_finding(image_name: str, index: int, row: dict[str, str], width: int, height: int) -> FindingSpec:
    x, y, w, h = (float(row[c]) for c in ("x", "y", "w", "h"))
    attributes: dict[str, object] = {"label_source": "radiologist box"}
    label = LABEL_SPELLING.get(row["finding"], row["finding"])
    if label != row["finding"]:
        attributes["label_as_given"] = row["finding"]
    return FindingSpec(
        source_key=f"{NAME}:{image_name}:box{index}",
        pathology=UNKNOWN,
        abnormality_class=label,
        box=clip_box(x, y, x + w, y + h, width, height),
        attributes=attributes,
    )


def _dataset(pixels: np.ndarray, image_name: str, patient: str, entry: dict[str, str]):
    stem = image_name.removesuffix(".png")
    follow_up = int(entry["Follow-up #"] or 0)
    patient_id = f"{int(patient):08d}" if patient.isdigit() else patient
    view = entry["View Position"].upper()
    date = (FIRST_VISIT + dt.timedelta(days=follow_up)).strftime("%Y%m%d")
    return image_dataset(
        pixels,
        sop_class_uid=SECONDARY_CAPTURE,
        sop_instance_uid=dataset_uid(NAME, "instance", image_name),
        study_instance_uid=dataset_uid(NAME, "study", image_name),
        series_instance_uid=dataset_uid(NAME, "series", image_name),
        PatientID=f"NIH-{patient_id}",
        IssuerOfPatientID="NIH-CXR14",
        PatientName=f"NIH^{patient_id}",
        PatientSex=entry["Patient Gender"].upper()[:1],
        PatientAge=_age(entry["Patient Age"]),
        PatientBirthDate="",
        StudyDate=date,
        StudyTime="",
        StudyID=str(follow_up),
        AccessionNumber=stem,
        ReferringPhysicianName="",
        StudyDescription="Chest X-ray (NIH ChestX-ray14)",
        Modality="DX",
        SeriesNumber=1,
        SeriesDescription=f"Chest {view}",
        ConversionType="WSD",  # NIH exported the PACS images, downsampled to 1024²
        SecondaryCaptureDeviceManufacturer="Precedent",
        InstanceNumber=1,
        ImageType=["DERIVED", "SECONDARY"],
        PatientOrientation="",
        BodyPartExamined="CHEST",
        ViewPosition=view,
        ContentDate=date,
        WindowCenter=128,
        WindowWidth=256,
    )


def _age(text: str) -> str:
    """DICOM AS is three digits and a unit; NIH ages are years (a few are implausible)."""
    return f"{int(text):03d}Y" if text.isdigit() and int(text) < 1000 else ""
