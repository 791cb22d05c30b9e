"""AI results as DICOM: SR (TID 1500) and SEG written with highdicom, read back with
highdicom and pydicom, stored through ingest and fetched over WADO-RS."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pydicom
import pytest
from exports import ai_dicom
from exports.ai_dicom import Algorithm, Box, Mask
from exports.models import AiDicomResult
from PIL import Image

from tests.exports.conftest import CT

BOXES = [Box("mass", 0.91, 10, 20, 30, 40), Box("calcification", 0.42, 60.5, 70, 90, 100)]


def reread(ds) -> io.BytesIO:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return buffer


def lesion_mask(rows: int, columns: int) -> np.ndarray:
    mask = np.zeros((rows, columns), dtype=np.uint8)
    mask[5:20, 7:30] = 255
    mask[50:60, 40:44] = 255
    return mask


# --- the pure core -------------------------------------------------------------------------


def test_detections_become_a_tid1500_measurement_report(dicom_files):
    source = pydicom.dcmread(dicom_files / CT)
    sr = ai_dicom.detections_to_sr(source, BOXES, algorithm=Algorithm("det-v1", software_version="0.1"))
    report = hd.sr.srread(reread(sr))
    assert report.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert (report.StudyInstanceUID, report.PatientID) == (source.StudyInstanceUID, source.PatientID)
    assert report.SeriesInstanceUID != source.SeriesInstanceUID and report.Manufacturer == "Precedent"
    groups = report.content.get_planar_roi_measurement_groups(referenced_sop_instance_uid=source.SOPInstanceUID)
    assert len(groups) == 2
    first, second = groups
    assert first.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    np.testing.assert_allclose(first.roi.value, [[10, 20], [30, 20], [30, 40], [10, 40], [10, 20]])
    np.testing.assert_allclose(second.roi.value[0], [60.5, 70])
    assert first.finding_type.value == "4147007"  # SCT Mass
    assert second.finding_type.meaning == "calcification"
    assert first.get_measurements()[0].value == pytest.approx(0.91)
    assert first.get_qualitative_evaluations(name=ai_dicom.MODEL_LABEL)[0].value.meaning == "Mass"
    reference = first.roi.ContentSequence[0].ReferencedSOPSequence[0]
    assert (reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID) == (
        source.SOPClassUID,
        source.SOPInstanceUID,
    )
    # pydicom alone sees the evidence too.
    plain = pydicom.dcmread(reread(sr))
    evidence = plain.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_masks_become_a_binary_segmentation(dicom_files):
    source = pydicom.dcmread(dicom_files / CT)
    lesion = lesion_mask(source.Rows, source.Columns)
    whole = np.full_like(lesion, 255)
    seg = ai_dicom.masks_to_seg(
        source, [Mask("lesion", lesion), Mask("breast", whole)], algorithm=Algorithm("seg-v1", "segmenter")
    )
    read = hd.seg.segread(reread(seg))
    assert read.SegmentationType == "BINARY" and read.BitsAllocated == 1
    assert (read.StudyInstanceUID, read.PatientName) == (source.StudyInstanceUID, source.PatientName)
    assert [s.SegmentLabel for s in read.SegmentSequence] == ["lesion", "breast"]
    assert read.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"
    algorithm = read.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "seg-v1"
    pixels = read.get_pixels_by_source_instance(
        source_sop_instance_uids=[source.SOPInstanceUID], segment_numbers=[1, 2]
    )
    assert np.array_equal(pixels[0, :, :, 0] > 0, lesion > 0)
    assert pixels[0, :, :, 1].all()
    plain = pydicom.dcmread(reread(seg))
    assert plain.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == (
        source.SOPInstanceUID
    )


def test_bad_model_output_is_refused(dicom_files):
    source = pydicom.dcmread(dicom_files / CT)
    with pytest.raises(ai_dicom.AiDicomError, match="no detections"):
        ai_dicom.detections_to_sr(source, [], algorithm=Algorithm("d"))
    with pytest.raises(ai_dicom.AiDicomError, match="empty inside the image"):
        ai_dicom.detections_to_sr(source, [Box("mass", 0.5, 500, 500, 600, 600)], algorithm=Algorithm("d"))
    with pytest.raises(ai_dicom.AiDicomError, match="the image is"):
        ai_dicom.masks_to_seg(source, [Mask("lesion", np.zeros((3, 3)))], algorithm=Algorithm("s"))


# --- stored, served, linked ------------------------------------------------------------------


@pytest.fixture
def model_outputs(ct, model_version, precedent_home):
    from triage.models import Detection, SegmentationMask

    detector = model_version("detector", "det-test-1")
    segmenter = model_version("segmenter", "seg-test-1")
    for box in BOXES:
        Detection.objects.create(
            instance=ct, model_version=detector, label=box.label, score=box.score,
            x0=box.x0, y0=box.y0, x1=box.x1, y1=box.y1,
        )  # fmt: skip
    mask = lesion_mask(ct.rows, ct.columns)
    (precedent_home / "masks").mkdir()
    Image.fromarray(mask).save(precedent_home / "masks" / "lesion.png")
    SegmentationMask.objects.create(instance=ct, model_version=segmenter, label="lesion", mask_path="masks/lesion.png")
    return mask


def wado_instance(client, url: str) -> pydicom.Dataset:
    response = client.get(url, HTTP_ACCEPT='multipart/related; type="application/dicom"')
    assert response.status_code == 200
    body = b"".join(response.streaming_content) if response.streaming else response.content
    boundary = response["Content-Type"].split("boundary=")[1].split(";")[0].strip('"')
    part = body.split(f"--{boundary}".encode())[1]
    return pydicom.dcmread(io.BytesIO(part.split(b"\r\n\r\n", 1)[1].rstrip(b"\r\n")))


@pytest.mark.django_db
def test_ai_results_are_stored_and_served_over_wado_rs(api, ct, model_outputs):
    url = f"/api/v1/instances/{ct.sop_instance_uid}/ai-results/"
    response = api.post(url)
    assert response.status_code == 201, response.content
    results = {r["kind"]: r for r in response.json()["results"]}
    assert set(results) == {"sr", "seg"}
    assert results["sr"]["study_instance_uid"] == ct.series.study.study_instance_uid
    fetched_sr = wado_instance(api, results["sr"]["wado_url"].replace("http://testserver", ""))
    report = hd.sr.srread(reread(fetched_sr))
    groups = report.content.get_planar_roi_measurement_groups(referenced_sop_instance_uid=ct.sop_instance_uid)
    assert sorted(round(g.get_measurements()[0].value, 2) for g in groups) == [0.42, 0.91]
    fetched_seg = wado_instance(api, results["seg"]["wado_url"].replace("http://testserver", ""))
    seg = hd.seg.segread(reread(fetched_seg))
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[ct.sop_instance_uid], segment_numbers=[1])
    assert np.array_equal(pixels[0, :, :, 0] > 0, model_outputs > 0)
    # Idempotent per (source, model version): the same instances again, nothing new stored.
    again = api.post(url)
    assert again.status_code == 200
    assert {r["sop_instance_uid"] for r in again.json()["results"]} == {r["sop_instance_uid"] for r in results.values()}
    assert AiDicomResult.objects.count() == 2


@pytest.mark.django_db
def test_the_viewer_offers_store_then_download(browser_client, ct, model_outputs):
    viewer = f"/studies/{ct.series.study.study_instance_uid}/?instance={ct.sop_instance_uid}"
    page = browser_client.get(viewer).content.decode()
    assert "Store as DICOM SR/SEG" in page and "Download SR" not in page
    response = browser_client.post(f"/exports/instances/{ct.sop_instance_uid}/ai-results/")
    assert response.status_code == 302
    page = browser_client.get(viewer).content.decode()
    assert "Download SR" in page and "Download SEG" in page and "Store as DICOM SR/SEG" not in page
    stored = AiDicomResult.objects.get(kind="seg").instance
    download = browser_client.get(f"/api/v1/instances/{stored.sop_instance_uid}/file")
    body = b"".join(download.streaming_content)
    assert pydicom.dcmread(io.BytesIO(body)).Modality == "SEG"


@pytest.mark.django_db
def test_no_results_unknown_and_not_an_image(api, ct, dicom_files, ingest):
    assert api.post(f"/api/v1/instances/{ct.sop_instance_uid}/ai-results/").status_code == 409
    assert "no model results" in api.post(f"/api/v1/instances/{ct.sop_instance_uid}/ai-results/").json()["error"]
    assert api.post("/api/v1/instances/1.2.3.4/ai-results/").status_code == 404
    report = ingest(dicom_files / "pydicom-test_files/test-SR.dcm")
    response = api.post(f"/api/v1/instances/{report.sop_instance_uid}/ai-results/")
    assert response.status_code == 409 and "not an image" in response.json()["error"]
