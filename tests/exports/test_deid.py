"""De-identification (exports/deid.py) on real files: the PS3.15 basic profile's
actions, private tags, consistent UID remapping, pixel data untouched."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pydicom
import pytest
from exports import deid
from exports.deid import Deidentifier
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

CT = "pydicom-test_files/CT_small.dcm"
NESTED_PRIVATE = "pydicom-test_files/nested_priv_SQ.dcm"
SR = "pydicom-test_files/test-SR.dcm"
STUDY_DIR = "pydicom-test_files/dicomdirtests/98892003"  # one patient, 3 studies, 17 MR images


def read(dicom_files: Path, name: str) -> Dataset:
    return pydicom.dcmread(dicom_files / name)


def roundtrip(ds: Dataset, *, enforce: bool = True) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=enforce)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def test_the_table_comes_from_the_standard():
    # A few rows of PS3.15 Table E.1-1 (basic profile column), resolved as documented.
    assert deid.action_for(Tag("PatientName")) == "Z"
    assert deid.action_for(Tag("PatientBirthDate")) == "Z"
    assert deid.action_for(Tag("AccessionNumber")) == "Z"
    assert deid.action_for(Tag("StudyInstanceUID")) == "U"
    assert deid.action_for(Tag("FrameOfReferenceUID")) == "U"
    assert deid.action_for(Tag("ReferencedSOPInstanceUID")) == "U"
    assert deid.action_for(Tag("PatientAddress")) == "X"
    assert deid.action_for(Tag("InstitutionName")) == "Z"  # X/Z/D
    assert deid.action_for(Tag("ContentDate")) == "D"  # Z/D, Type 1 in SR and SEG
    assert deid.action_for(Tag("ReferencedImageSequence")) == "U"  # X/Z/U*
    assert deid.action_for(Tag(0x6002, 0x3000)) == "X"  # overlay data, a repeating group
    assert deid.action_for(Tag("Rows")) is None  # not listed: kept
    assert deid.action_for(Tag("SOPClassUID")) is None
    assert len(deid.BASIC_PROFILE) > 500


def test_ct_removed_kept_and_replaced(dicom_files):
    original = read(dicom_files, CT)
    ds = roundtrip(Deidentifier().deidentify(read(dicom_files, CT)))

    # Replaced: identity becomes a pseudonym, UIDs move to the 2.25 root.
    assert ds.PatientID.startswith("ANON-") and ds.PatientName == ds.PatientID
    assert ds.PatientID != original.PatientID
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        assert ds[keyword].value.startswith("2.25.") and ds[keyword].value != original[keyword].value
        assert len(ds[keyword].value) <= 64
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    # Emptied or removed.
    assert not ds.get("StudyDate")
    assert not ds.get("InstitutionName")
    assert not ds.get("StationName")
    assert not ds.get("StudyID")
    assert "PatientBirthDate" not in ds or ds.PatientBirthDate == ""
    # Kept: what the images mean.
    kept = ("SOPClassUID", "Modality", "Rows", "Columns", "BitsAllocated", "PixelSpacing", "ImagePositionPatient")
    for keyword in kept:
        assert ds[keyword].value == original[keyword].value, keyword
    assert ds.PixelData == original.PixelData
    assert (ds.pixel_array == original.pixel_array).all()
    # Marked as de-identified, with the profile's code.
    assert ds.PatientIdentityRemoved == "YES"
    assert "Basic Profile" in ds.DeidentificationMethod
    code = ds.DeidentificationMethodCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("113100", "DCM")
    # Private tags gone (CT_small has GE private groups).
    assert any(element.tag.is_private for element in original.iterall())
    assert not any(element.tag.is_private for element in ds.iterall())


def test_private_tags_are_removed_inside_sequences(dicom_files):
    original = read(dicom_files, NESTED_PRIVATE)
    assert any(element.tag.is_private for element in original.iterall())
    ds = roundtrip(Deidentifier().deidentify(original), enforce=False)  # a fragment: no SOP UIDs
    assert not any(element.tag.is_private for element in ds.iterall())


def test_sr_content_and_references_are_de_identified(dicom_files):
    original = read(dicom_files, SR)
    names = {str(e.value) for e in original.iterall() if e.VR == "PN" and e.value}
    uids = {str(e.value) for e in original.iterall() if e.VR == "UI" and deid.action_for(e.tag) == "U"}
    assert names and uids
    ds = roundtrip(Deidentifier().deidentify(original))
    left = {str(e.value) for e in ds.iterall() if e.value not in (None, "")}
    assert not names & left
    assert not uids & left


def study_files(dicom_files: Path) -> list[Path]:
    return sorted(path for path in (dicom_files / STUDY_DIR).glob("*/*") if path.is_file())


def test_uids_are_remapped_consistently_across_a_study(dicom_files):
    files = study_files(dicom_files)
    assert len(files) == 17
    originals = [pydicom.dcmread(path) for path in files]
    # One image references another (as a Referenced Image Sequence would).
    reference = Dataset()
    reference.ReferencedSOPClassUID = originals[1].SOPClassUID
    reference.ReferencedSOPInstanceUID = originals[1].SOPInstanceUID
    originals[0].ReferencedImageSequence = Sequence([reference])

    deidentifier = Deidentifier()
    out = [roundtrip(deidentifier.deidentify(pydicom.dcmread(path))) for path in files[1:]]
    first = roundtrip(deidentifier.deidentify(copy.deepcopy(originals[0])))
    out.insert(0, first)

    def mapping(keyword: str) -> dict[str, str]:
        pairs: dict[str, set[str]] = {}
        for before, after in zip(originals, out, strict=True):
            pairs.setdefault(before[keyword].value, set()).add(after[keyword].value)
        assert all(len(new) == 1 for new in pairs.values()), f"{keyword} mapped inconsistently"
        assert len({next(iter(new)) for new in pairs.values()}) == len(pairs), f"{keyword} collided"
        return {old: next(iter(new)) for old, new in pairs.items()}

    studies = mapping("StudyInstanceUID")
    mapping("SeriesInstanceUID")
    sops = mapping("SOPInstanceUID")
    frames = mapping("FrameOfReferenceUID")
    assert len(sops) == 17
    assert len({ds.PatientID for ds in out}) == 1  # one patient, one pseudonym
    # The same original UID maps the same whichever attribute holds it.
    for old, new in frames.items():
        if old in studies:
            assert studies[old] == new
    # The reference follows its target.
    assert first.ReferencedImageSequence[0].ReferencedSOPInstanceUID == out[1].SOPInstanceUID
    assert first.ReferencedImageSequence[0].ReferencedSOPClassUID == originals[1].SOPClassUID
    # Another export maps the same study elsewhere: exports cannot be linked.
    other = Deidentifier().deidentify(pydicom.dcmread(files[0]))
    assert other.StudyInstanceUID != first.StudyInstanceUID
    # A fixed key gives the same mapping (what makes it a keyed hash, not a random table).
    assert Deidentifier(key=b"k").uid("1.2.3") == Deidentifier(key=b"k").uid("1.2.3")


def test_burned_in_annotation_is_flagged(dicom_files):
    ds = read(dicom_files, CT)
    assert deid.burned_in_annotation(ds) is None
    ds.BurnedInAnnotation = "YES"
    assert "Burned In Annotation" in deid.burned_in_annotation(ds)


@pytest.mark.parametrize(
    "name",
    [
        "pydicom-test_files/MR_small.dcm",
        "pydicom-test_files/JPEG2000.dcm",
        "pydicom-test_files/SC_rgb_rle.dcm",
        "pydicom-test_files/examples_overlay.dcm",
        "pydicom-data/emri_small.dcm",
    ],
)
def test_pixel_data_survives_every_encoding(dicom_files, name):
    original = read(dicom_files, name)
    ds = roundtrip(Deidentifier().deidentify(read(dicom_files, name)))
    assert ds.PixelData == original.PixelData
    assert ds.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert not any(element.tag.is_private for element in ds.iterall())
    assert not any(element.tag.group & 0xFF00 == 0x6000 and element.tag.element == 0x3000 for element in ds)
