"""CBIS-DDSM sample mammograms: real MG DICOMs + labels.csv rows.

labels.csv has one row per abnormality for every file of the source package; only the
files present under the folder are imported (PROVENANCE: two of eight are staged).
CBIS-DDSM locates its lesions with ROI masks, which were not staged, so the findings
carry pathology, class and BI-RADS but no box.

The pixel data is kept as it is (RLE, byte for byte); the header is coerced on import,
as a PACS reconciles what it receives: CBIS names a patient per image
(Mass-Test_P_00173_LEFT_CC), which would put one woman's views in different patients
and leak across patient-level splits, so PatientID becomes the woman (labels.csv
patient_id, issuer CBIS-DDSM) with one study per woman; laterality and view, empty in
the DICOM, come from the label row; the UIDs are generated from the CBIS image name
(a re-import is all duplicates), and ImageComments keep the original ID.
"""

from __future__ import annotations

import io
from pathlib import Path

from studies import dicom
from studies.errors import IngestError

from .base import (
    BENIGN,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    MALIGNANT,
    UNKNOWN,
    Conversion,
    FindingSpec,
    Item,
    dataset_uid,
    find_root,
    group_rows,
    read_csv,
)

NAME = "cbis-ddsm"
FOLDER = "cbis-ddsm-mg-samples"
COLUMNS = (
    "package_file",
    "staged_here",
    "dicom_PatientID",
    "patient_id",
    "breast_density",
    "left or right breast",
    "image view",
    "abnormality id",
    "abnormality type",
    "mass shape",
    "mass margins",
    "assessment",
    "pathology",
    "subtlety",
)
PATHOLOGY = {"MALIGNANT": MALIGNANT, "BENIGN": BENIGN, "BENIGN_WITHOUT_CALLBACK": BENIGN}


def read(path: Path, *, limit: int | None = None) -> Conversion:
    """Open the CBIS-DDSM samples folder (or the datasets root holding it)."""
    root = find_root(path, FOLDER, "labels.csv")
    rows_by_file = group_rows(read_csv(root / "labels.csv", COLUMNS), "package_file")
    # A file the labels list as staged but which is missing is reported; the package's
    # other files are only imported when someone has added them to the folder.
    files = [name for name, rows in rows_by_file.items() if (root / name).is_file() or rows[0]["staged_here"] == "yes"]
    notes = []
    if absent := len(rows_by_file) - len(files):
        notes.append(f"{absent} labelled file(s) of the source package are not in {root} (not staged)")
    if limit is not None:
        files = files[:limit]
    return Conversion(
        dataset=NAME,
        description="CBIS-DDSM sample mammograms (Sawyer-Lee et al., TCIA 2016), CC BY 3.0",
        total=len(files),
        items=(_item(root, name, rows_by_file[name]) for name in files),
        notes=notes,
    )


def _item(root: Path, name: str, rows: list[dict[str, str]]) -> Item:
    path = root / name
    if not path.is_file():
        return Item(name=name, dicom=None, problem="listed as staged in labels.csv but missing")
    try:
        # The source as ingest would judge it (not DICOM, cut short, ...): pydicom's
        # lenient read and a re-save would otherwise make a cut file look whole.
        dicom.read_header(path, verify_pixels=False)
    except IngestError as exc:
        return Item(name=name, dicom=None, problem=exc.reason)
    return Item(name=name, dicom=_coerced(path, rows[0]), findings=[_finding(row) for row in rows])


def _coerced(path: Path, row: dict[str, str]) -> bytes:
    """The file with its header coerced (module docstring); pixel data untouched."""
    ds = dicom.read_dataset(path)
    image, patient = row["dicom_PatientID"], row["patient_id"]
    ds.ImageComments = f"CBIS-DDSM image {image} (its PatientID in the source); header coerced on import"
    ds.PatientID, ds.IssuerOfPatientID = patient, "CBIS-DDSM"
    side = row["left or right breast"].upper()
    ds.ImageLaterality = {"LEFT": "L", "RIGHT": "R"}.get(side, "")
    ds.ViewPosition = row["image view"].upper()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = dataset_uid(NAME, "instance", image)
    ds.SeriesInstanceUID = dataset_uid(NAME, "series", image)
    ds.StudyInstanceUID = dataset_uid(NAME, "study", patient)
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _finding(row: dict[str, str]) -> FindingSpec:
    side = row["left or right breast"].upper()
    return FindingSpec(
        source_key=f"{NAME}:{row['dicom_PatientID']}:{row['abnormality id']}",
        pathology=PATHOLOGY.get(row["pathology"].upper(), UNKNOWN),
        abnormality_class=row["abnormality type"],
        attributes={
            "birads": _int(row["assessment"]),
            "pathology_as_given": row["pathology"],
            "breast_density": _int(row["breast_density"]),
            "laterality": {"LEFT": "L", "RIGHT": "R"}.get(side, side),
            "view": row["image view"],
            "mass_shape": row["mass shape"],
            "mass_margins": row["mass margins"],
            "subtlety": _int(row["subtlety"]),
            "cbis_patient_id": row["patient_id"],
        },
    )


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None
