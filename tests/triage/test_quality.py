"""The image-quality rules (triage/quality.py) on real files and synthetic arrays. No database."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from studies import dicom
from studies.datasets.base import encode, image_dataset
from triage import quality

MAMMOGRAPHY = quality.tasks_named(["mammography"])
BOTH = quality.tasks_named(["mammography", "chest"])


def facts(**changes) -> quality.ImageFacts:
    values = dict(
        modality="MG",
        body_part="BREAST",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2",
        has_pixel_data=True,
        rows=1024,
        columns=1024,
        bits_stored=12,
        photometric_interpretation="MONOCHROME2",
    )
    return quality.ImageFacts(**{**values, **changes})


def write(tmp_path: Path, pixels: np.ndarray, name: str = "image.dcm", **attributes) -> Path:
    attributes = {"Modality": "MG", "BodyPartExamined": "BREAST", **attributes}
    photometric = attributes.pop("PhotometricInterpretation", None)
    ds = image_dataset(
        pixels,
        sop_class_uid=attributes.pop("SOPClassUID", "1.2.840.10008.5.1.4.1.1.1.2"),
        sop_instance_uid=pydicom.uid.generate_uid(),
        study_instance_uid=pydicom.uid.generate_uid(),
        series_instance_uid=pydicom.uid.generate_uid(),
        **attributes,
    )
    if photometric:
        ds.PhotometricInterpretation = photometric
    path = tmp_path / name
    path.write_bytes(encode(ds))
    return path


# --- real files ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sfm-malign-0/1-280.dcm", "sfm-benign-0/1-130.dcm"])
def test_full_size_cbis_mammograms_are_assessable(datasets: Path, name: str):
    verdict = quality.assess_file(datasets / "cbis-ddsm-mg-samples" / name, MAMMOGRAPHY)
    assert verdict.assessable and verdict.task == "mammography" and verdict.reasons == ()
    # Two thirds of these films are background at the darkest value: normal, not clipping.
    assert verdict.metrics["dark_clipped"] > 0.6


def test_a_ct_slice_is_not_a_mammogram(dicom_files: Path):
    path = dicom_files / "pydicom-test_files" / "CT_small.dcm"
    assert quality.assess_file(path, MAMMOGRAPHY).reasons == ("not a mammogram (modality CT)",)
    assert quality.assess_file(path, BOTH).reasons == ("not a mammogram or chest radiograph (modality CT)",)


def test_a_structured_report_has_no_pixel_data(dicom_files: Path):
    verdict = quality.assess_file(dicom_files / "pydicom-test_files" / "reportsi.dcm", BOTH)
    assert not verdict.assessable and verdict.reasons == ("no pixel data (not an image)",)


def test_an_extremity_radiograph_is_not_a_chest_film_and_its_shutter_is_not_clipping(dicom_files: Path):
    path = dicom_files / "pydicom-data" / "RG3_J2KR.dcm"
    verdict = quality.assess_file(path, BOTH)
    assert verdict.reasons == ("not a chest radiograph: body part EXTREMITY, expected CHEST",)
    # The white collimator border covers ~40 % of this film; the pixel rules accept it.
    ds = dicom.read_dataset(path, stop_before_pixels=True)
    pixels = dicom.decode_frame(path, ds)
    reasons, metrics = quality.check_pixels(pixels, facts(bits_stored=10, photometric_interpretation="MONOCHROME1"))
    assert reasons == [] and 0.3 < metrics["bright_clipped"] < 0.5


def test_a_truncated_file_is_not_assessable_with_the_reason(dicom_files: Path):
    verdict = quality.assess_file(dicom_files / "pydicom-test_files" / "MR_truncated.dcm", BOTH)
    assert not verdict.assessable
    assert verdict.reasons[0].startswith("Pixel Data is 8130 bytes")


def test_pixel_data_that_cannot_be_decoded(tmp_path: Path, film: np.ndarray):
    path = write(tmp_path, film, PhotometricInterpretation="PALETTE COLOR")
    verdict = quality.assess_file(path, MAMMOGRAPHY)
    assert not verdict.assessable
    assert verdict.reasons[0].startswith("pixel data cannot be decoded")


def test_a_missing_file_is_a_reason_not_an_exception(tmp_path: Path):
    verdict = quality.assess(facts(), tmp_path / "gone.dcm", MAMMOGRAPHY)
    assert not verdict.assessable and verdict.reasons[0].startswith("the stored file cannot be read: FileNotFoundError")


def test_a_real_film_passes_and_a_blanked_copy_does_not(tmp_path: Path, film: np.ndarray):
    assert quality.assess_file(write(tmp_path, film), MAMMOGRAPHY).assessable
    blank = np.full_like(film, 37)
    verdict = quality.assess_file(write(tmp_path, blank, "blank.dcm"), MAMMOGRAPHY)
    assert verdict.reasons == ("blank image: the pixel values are (nearly) constant",)


def test_tiny_and_for_processing_mammograms(tmp_path: Path, film: np.ndarray):
    small = write(tmp_path, film[::4, ::4], "small.dcm")
    assert quality.assess_file(small, MAMMOGRAPHY).reasons == (
        "image too small for mammography triage: 256×256 px (needs ≥ 512 px on the long side)",
    )
    raw = write(tmp_path, film, "raw.dcm", SOPClassUID=quality.MG_FOR_PROCESSING)
    assert quality.assess_file(raw, MAMMOGRAPHY).reasons == (
        "a For Processing (raw detector) image, not one for presentation",
    )


def test_wrong_body_part_for_mammography():
    verdict = quality.check_header(facts(body_part="CHEST"), MAMMOGRAPHY)
    assert verdict.reasons == ("not a mammogram: body part CHEST, expected BREAST",)
    assert quality.check_header(facts(body_part=""), MAMMOGRAPHY).assessable  # many files do not say


def test_unknown_task_names_are_refused():
    with pytest.raises(ValueError, match="unknown triage task knee"):
        quality.tasks_named(["mammography", "knee"])


# --- synthetic arrays ---------------------------------------------------------------------


def test_noise_around_a_constant_is_blank():
    rng = np.random.default_rng(0)
    pixels = 2000 + rng.integers(-3, 4, size=(600, 600)).astype(np.float32)
    reasons, metrics = quality.check_pixels(pixels, facts())
    assert reasons == ["blank image: the pixel values are (nearly) constant"] and metrics["spread"] < 0.005


def test_saturated_and_empty_images_are_clipped():
    ramp = np.tile(np.linspace(0, 4095, 600, dtype=np.float32), (600, 1))
    saturated = ramp.copy()
    saturated[:, :400] = 4095
    reasons, _ = quality.check_pixels(saturated, facts())
    assert reasons == ["heavily clipped: 67% of the pixels at the brightest value"]
    empty = np.zeros((600, 600), np.float32)
    empty[:20, :] = ramp[:20, :]
    reasons, _ = quality.check_pixels(empty, facts())
    assert reasons == ["heavily clipped: 97% of the pixels at the darkest value"]


def test_clipping_is_judged_as_displayed_for_monochrome1():
    pixels = np.tile(np.linspace(0, 4095, 600, dtype=np.float32), (600, 1))
    pixels[:, :400] = 0  # the lowest stored value is the brightest on screen in MONOCHROME1
    assert quality.check_pixels(pixels, facts())[0] == []  # 67 % dark in MONOCHROME2: background
    reasons, _ = quality.check_pixels(pixels, facts(photometric_interpretation="MONOCHROME1"))
    assert reasons == ["heavily clipped: 67% of the pixels at the brightest value"]
