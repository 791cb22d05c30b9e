"""Every file of dicom-test-files, as its manifest.csv lists them, through every path.

Valid instances are stored and, where they carry pixels, previewable; deliberately
broken files are rejected with their specific one-line reason; nothing crashes and no
request answers 5xx.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pydicom
import pytest

from studies import services
from studies.models import Instance
from studies.services import Outcome
from tests.conftest import upload

# Files that must be rejected, with the reason a sender should read.
REJECTED = {
    "pydicom-test_files/meta_missing_tsyntax.dcm": "File Meta Information lacks TransferSyntaxUID",
    "pydicom-test_files/UN_sequence.dcm": "missing SOPClassUID",
    "pydicom-test_files/nested_priv_SQ.dcm": "missing SOPClassUID",
    "pydicom-test_files/no_meta_group_length.dcm": "missing SOPClassUID",
    "pydicom-test_files/priv_SQ.dcm": "missing SOPClassUID",
    "pydicom-test_files/empty_charset_LEI.dcm": "missing SOPClassUID",
    "pydicom-test_files/JPEGLSNearLossless_08.dcm": "missing StudyInstanceUID",
    "pydicom-test_files/JPEGLSNearLossless_16.dcm": "missing StudyInstanceUID",
    "pydicom-test_files/SC_rgb_jls_lossy_line.dcm": "missing StudyInstanceUID",
    "pydicom-test_files/SC_rgb_jls_lossy_sample.dcm": "missing StudyInstanceUID",
    "pydicom-data/bad_sequence.dcm": "is not a valid DICOM UID",
    "pydicom-data/emri_small_jpeg_2k_lossless_too_short.dcm": "file is truncated",
    "pydicom-test_files/MR_truncated.dcm": "Pixel Data is 8130 bytes, but",
    "pydicom-test_files/rtplan_truncated.dcm": "file is truncated: element (300A,00B0) needs 976 bytes",
    "pydicom-test_files/badVR.dcm": "NumberOfFrames (0028,0008) is not a valid integer: '1A'",
    "pydicom-test_files/JPEG-lossy.dcm": "pixel data cannot be decoded (JPEG Extended",
    "pydicom-test_files/JPEG2000-embedded-sequence-delimiter.dcm": "pixel data cannot be decoded (JPEG 2000",
}
CONFLICT = "is already stored with different content"


def manifest(dicom_files: Path) -> list[dict[str, str]]:
    with open(dicom_files / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def expected_reason(row: dict[str, str]) -> str | None:
    """The reason a file must be rejected for, or None when it must be accepted."""
    if row["path"] in REJECTED:
        return REJECTED[row["path"]]
    if row["read_default"].startswith("error"):
        return "not a DICOM Part 10 file: no 128-byte preamble"
    if "DICOMDIR" in row["path"]:
        return "this is a DICOMDIR (media directory)"
    return None


def sop_uid(path: Path) -> str:
    if path.suffix == ".gz":
        import gzip
        import io

        return pydicom.dcmread(io.BytesIO(gzip.open(path).read())).SOPInstanceUID
    return pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID


def check(row, result_outcome: str, reason: str, seen: dict[str, str], path: Path) -> None:
    """One manifest row against what ingest answered."""
    expected = expected_reason(row)
    if expected is not None:
        assert result_outcome == Outcome.REJECTED, row["path"]
        assert expected in reason, (row["path"], reason)
        return
    uid = sop_uid(path)
    if uid in seen:
        # The test set repeats some instances in other encodings under one SOPInstanceUID.
        assert result_outcome in (Outcome.DUPLICATE, Outcome.REJECTED), row["path"]
        if result_outcome == Outcome.REJECTED:
            assert CONFLICT in reason, (row["path"], reason)
    else:
        assert result_outcome == Outcome.STORED, (row["path"], reason)
        seen[uid] = row["path"]


@pytest.mark.django_db
def test_every_manifest_file_through_the_service(dicom_files: Path, api):
    rows = manifest(dicom_files)
    assert len(rows) == 201
    seen: dict[str, str] = {}
    for row in rows:
        path = dicom_files / row["path"]
        result = services.instance_ingest(source=path, name=row["path"])
        check(row, result.outcome, result.reason, seen, path)

    stored = Instance.objects.all()
    assert stored.count() == len(seen) > 100
    # Every stored instance with pixels renders through the API; the others say why not.
    previewed = 0
    for instance in stored:
        response = api.get(f"/api/v1/instances/{instance.sop_instance_uid}/thumbnail.png")
        if instance.is_previewable:
            assert response.status_code == 200, (instance.sop_instance_uid, response.content[:200])
            assert response["Content-Type"] == "image/png"
            previewed += 1
        else:
            assert response.status_code == 422
            assert "no image pixel data" in response.json()["error"]
    assert previewed == stored.filter(has_pixel_data=True).count() > 75


@pytest.mark.django_db
def test_every_manifest_file_through_rest(dicom_files: Path, api, precedent_home: Path):
    seen: dict[str, str] = {}
    for row in manifest(dicom_files):
        path = dicom_files / row["path"]
        response = api.post("/api/v1/instances/", {"file": upload(path.name, path.read_bytes())}, format="multipart")
        assert response.status_code < 500, row["path"]
        entry = response.json()["results"][0]
        check(row, entry["outcome"], entry.get("error", ""), seen, path)
        if entry["outcome"] == "rejected":
            assert response.status_code in (400, 409, 415)
            assert response.json()["error"] == entry["error"]
    # Nothing half-written: one file per row, no spooled leftovers.
    files = sorted((precedent_home / "dicom").rglob("*.dcm"))
    assert len(files) == Instance.objects.count() == len(seen)
    assert list((precedent_home / "tmp").iterdir()) == []
