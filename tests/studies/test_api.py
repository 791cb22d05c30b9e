"""REST API: auth, upload outcomes and statuses, bad input, list/detail, rendering."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from rest_framework.test import APIClient

from studies import services, storage
from studies.models import Instance, Patient, Study
from tests.conftest import upload

pytestmark = pytest.mark.django_db
CT = "pydicom-test_files/CT_small.dcm"


def store(path: Path):
    result = services.instance_ingest(source=path)
    assert result.ok, result.reason
    return result.instance


def nothing_written(home: Path) -> bool:
    return not list((home / "dicom").rglob("*")) if (home / "dicom").exists() else True


# --- authentication --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("get", "/api/v1/studies/"),
        ("get", "/api/v1/studies/1.2.3/"),
        ("post", "/api/v1/instances/"),
        ("get", "/api/v1/instances/1.2.3/"),
        ("get", "/api/v1/instances/1.2.3/preview.png"),
        ("get", "/api/v1/instances/1.2.3/thumbnail.png"),
        ("get", "/api/v1/instances/1.2.3/file"),
    ],
)
def test_every_endpoint_needs_authentication(method, url):
    response = getattr(APIClient(), method)(url)
    assert response.status_code == 401
    assert "error" in response.json()


def test_session_login_works_too(client, user, dicom_files):
    store(dicom_files / CT)
    client.force_login(user)
    assert client.get("/api/v1/studies/").status_code == 200


def test_drf_create_token_command(user):
    from django.core.management import call_command

    call_command("drf_create_token", user.username)
    from rest_framework.authtoken.models import Token

    assert Token.objects.filter(user=user).exists()


# --- upload ----------------------------------------------------------------------------


def test_upload_stores_and_answers_uids(api, dicom_files, precedent_home):
    data = (dicom_files / CT).read_bytes()
    response = api.post("/api/v1/instances/", {"file": upload("ct.dcm", data)}, format="multipart")
    assert response.status_code == 201
    body = response.json()
    assert body["stored"] == 1
    entry = body["results"][0]
    ds = pydicom.dcmread(dicom_files / CT)
    assert entry["sop_instance_uid"] == ds.SOPInstanceUID
    assert entry["study_instance_uid"] == ds.StudyInstanceUID
    assert entry["series_instance_uid"] == ds.SeriesInstanceUID
    instance = Instance.objects.get(sop_instance_uid=ds.SOPInstanceUID)
    stored = precedent_home / instance.file_path
    assert stored.read_bytes() == data
    assert instance.sha256 in stored.name  # content-addressed


def test_same_file_twice_is_one_row_and_a_duplicate(api, dicom_files):
    data = (dicom_files / CT).read_bytes()
    api.post("/api/v1/instances/", {"file": upload("a.dcm", data)}, format="multipart")
    response = api.post("/api/v1/instances/", {"file": upload("b.dcm", data)}, format="multipart")
    assert response.status_code == 200
    assert response.json()["results"][0]["outcome"] == "duplicate"
    assert Instance.objects.count() == 1


def test_other_bytes_under_a_stored_uid_are_a_conflict(api, make_dicom):
    first = make_dicom()
    uid = pydicom.dcmread(__import__("io").BytesIO(first)).SOPInstanceUID
    api.post("/api/v1/instances/", {"file": upload("a.dcm", first)}, format="multipart")
    other = make_dicom(SOPInstanceUID=uid, PatientName="Other^Person")
    response = api.post("/api/v1/instances/", {"file": upload("b.dcm", other)}, format="multipart")
    assert response.status_code == 409
    assert "already stored with different content" in response.json()["error"]
    assert Instance.objects.get().series.study.patient.name == "CompressedSamples^CT1"


def test_many_files_mixed_outcomes(api, dicom_files, make_dicom):
    files = [
        upload("one.dcm", make_dicom()),
        upload("two.dcm", make_dicom()),
        upload("junk.dcm", b"this is not dicom at all" * 10),
    ]
    response = api.post("/api/v1/instances/", {"file": files}, format="multipart")
    assert response.status_code == 202
    body = response.json()
    assert (body["stored"], body["duplicates"], body["rejected"]) == (2, 0, 1)
    junk = body["results"][2]
    assert junk["file"] == "junk.dcm" and junk["status"] == 400 and "not a DICOM Part 10 file" in junk["error"]


@pytest.mark.parametrize(
    ("name", "payload", "status", "reason"),
    [
        ("empty.dcm", lambda d: b"", 400, "empty file"),
        ("text.dcm", lambda d: b"hello" * 100, 400, "not a DICOM Part 10 file"),
        ("truncated.dcm", lambda d: d[: len(d) // 2], 400, "Pixel Data is"),
        ("header-only.dcm", lambda d: d[:600], 400, ""),
    ],
)
def test_bad_files_are_rejected_and_leave_nothing(api, make_dicom, precedent_home, name, payload, status, reason):
    data = payload(make_dicom())
    response = api.post("/api/v1/instances/", {"file": upload(name, data)}, format="multipart")
    assert response.status_code == status
    assert reason in response.json()["error"]
    assert Instance.objects.count() == 0 and Study.objects.count() == 0 and Patient.objects.count() == 0
    assert nothing_written(precedent_home)
    assert list((precedent_home / "tmp").iterdir()) == []


def test_service_reports_unreadable_paths_instead_of_raising(tmp_path):
    for path in (tmp_path, tmp_path / "missing.dcm"):
        result = services.instance_ingest(source=path)
        assert result.outcome == "rejected" and result.reason.startswith("cannot read the file")


def test_missing_uid_is_rejected(api, make_dicom):
    data = make_dicom(transform=lambda ds: delattr(ds, "SeriesInstanceUID"))
    response = api.post("/api/v1/instances/", {"file": upload("x.dcm", data)}, format="multipart")
    assert response.status_code == 400
    assert response.json()["error"] == "missing SeriesInstanceUID (0020,000E)"


def test_unsupported_transfer_syntax_is_415(api, dicom_files):
    ds = pydicom.dcmread(dicom_files / "pydicom-test_files/JPEG2000.dcm")
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    buffer = __import__("io").BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    response = api.post("/api/v1/instances/", {"file": upload("mpeg.dcm", buffer.getvalue())}, format="multipart")
    assert response.status_code == 415
    assert "unsupported transfer syntax" in response.json()["error"]


def test_upload_over_the_limit_is_413_and_leaves_nothing(api, make_dicom, settings, precedent_home):
    settings.PRECEDENT_MAX_UPLOAD_BYTES = 10_000
    response = api.post("/api/v1/instances/", {"file": upload("big.dcm", make_dicom())}, format="multipart")
    assert response.status_code == 413
    assert "upload limit" in response.json()["error"]
    assert Instance.objects.count() == 0 and nothing_written(precedent_home)


def test_a_file_of_exactly_the_limit_is_stored_whatever_its_multipart_envelope(api, make_dicom, settings):
    data = make_dicom()
    settings.PRECEDENT_MAX_UPLOAD_BYTES = len(data)
    response = api.post("/api/v1/instances/", {"file": upload("exact.dcm", data)}, format="multipart")
    assert response.status_code == 201, response.json()
    one_more = make_dicom(PatientComments="x" * 64)
    assert len(one_more) > len(data)
    response = api.post("/api/v1/instances/", {"file": upload("over.dcm", one_more)}, format="multipart")
    assert response.status_code == 413 and "larger than the upload limit" in response.json()["error"]
    assert Instance.objects.count() == 1


def test_no_file_field_is_400(api):
    response = api.post("/api/v1/instances/", {"other": "x"}, format="multipart")
    assert response.status_code == 400
    assert "multipart fields named 'file'" in response.json()["error"]


# --- list and detail -------------------------------------------------------------------


def test_study_list_filters_and_pagination(api, make_dicom, dicom_files):
    from pydicom.uid import generate_uid

    for i in range(3):
        services.instance_ingest(
            source=__import__("io").BytesIO(
                make_dicom(
                    StudyInstanceUID=generate_uid(),
                    SeriesInstanceUID=generate_uid(),
                    PatientID=f"P{i}",
                    AccessionNumber=f"ACC{i}",
                    StudyDate=f"2024010{i + 1}",
                )
            )
        )
    store(dicom_files / "pydicom-test_files/MR_small.dcm")

    body = api.get("/api/v1/studies/").json()
    assert body["count"] == 4
    assert [
        s["patient"]["patient_id"] for s in api.get("/api/v1/studies/?modality=CT&sort=-date").json()["results"]
    ] == [
        "P0",
        "P1",
        "P2",
    ]
    assert api.get("/api/v1/studies/?modality=mr").json()["count"] == 1
    assert api.get("/api/v1/studies/?patient_id=P1").json()["results"][0]["accession_number"] == "ACC1"
    assert api.get("/api/v1/studies/?accession=ACC2").json()["count"] == 1
    assert api.get("/api/v1/studies/?date_from=2024-01-02&date_to=2024-01-03").json()["count"] == 2
    page = api.get("/api/v1/studies/?modality=CT&page_size=2&page=2").json()
    assert page["count"] == 3 and len(page["results"]) == 1 and page["previous"]
    bad = api.get("/api/v1/studies/?date_from=yesterday")
    assert bad.status_code == 400 and "date_from" in bad.json()["error"]
    assert api.get("/api/v1/studies/?date_from=2024-02-01&date_to=2024-01-01").status_code == 400


def test_studies_without_a_patient_id_are_not_one_patient_and_names_are_found_as_shown(api, make_dicom):
    import io

    from pydicom.uid import generate_uid

    def ingest(name: str, patient_id: str = "", study_uid: str = "") -> None:
        data = make_dicom(
            StudyInstanceUID=study_uid or generate_uid(),
            SeriesInstanceUID=generate_uid(),
            PatientID=patient_id,
            PatientName=name,
        )
        assert services.instance_ingest(source=io.BytesIO(data)).ok

    ingest("Citizen^Jan")
    ingest("Anonymized")
    shared_study = generate_uid()
    ingest("Doe^Ann", study_uid=shared_study)
    ingest("Doe^Ann", study_uid=shared_study)  # a second image of that study: the same patient
    ingest("Roe^Rick", patient_id="P-9")
    ingest("Roe^Rick", patient_id="P-9")  # a PatientID still joins its studies
    assert Patient.objects.filter(patient_id="").count() == 3
    assert Patient.objects.filter(patient_id="P-9").count() == 1
    assert sorted(Patient.objects.filter(patient_id="").values_list("name", flat=True)) == [
        "Anonymized",
        "Citizen^Jan",
        "Doe^Ann",
    ]

    def names(query: str) -> list[str]:
        response = api.get(f"/api/v1/studies/?{query}")
        assert response.status_code == 200
        return sorted(s["patient"]["name"] for s in response.json()["results"])

    assert names("q=Anonymized") == names("patient_name=anonymized") == ["Anonymized"]
    # As the list shows the name, as people type it, and as DICOM writes it.
    for spelled in ("Citizen%2C%20Jan", "jan%20citizen", "Citizen%5EJan", "CITIZEN"):
        assert names(f"q={spelled}") == ["Citizen^Jan"], spelled
    assert names("q=jan%20doe") == []  # every word must match


def test_study_detail_with_series_instances_and_findings(api, dicom_files):
    instance = store(dicom_files / CT)
    services.finding_upsert(
        instance=instance,
        source_key="t:1",
        pathology="benign",
        abnormality_class="CIRC",
        x0=10,
        y0=20,
        x1=30,
        y1=40,
        source="dataset",
    )
    uid = instance.series.study.study_instance_uid
    body = api.get(f"/api/v1/studies/{uid}/").json()
    assert body["study_instance_uid"] == uid
    assert body["patient"]["name"] == "CompressedSamples^CT1"
    inst = body["series"][0]["instances"][0]
    assert inst["sop_instance_uid"] == instance.sop_instance_uid
    assert inst["rows"] == 128 and inst["transfer_syntax"] == "Explicit VR Little Endian"
    assert inst["findings"][0]["box"] == [10.0, 20.0, 30.0, 40.0]
    assert inst["preview_url"].endswith("/preview.png")
    assert api.get("/api/v1/studies/9.9.9/").status_code == 404


def test_file_download_is_the_stored_bytes(api, dicom_files):
    instance = store(dicom_files / CT)
    response = api.get(f"/api/v1/instances/{instance.sop_instance_uid}/file")
    assert response.status_code == 200 and response["Content-Type"] == "application/dicom"
    assert b"".join(response.streaming_content) == (dicom_files / CT).read_bytes()


# --- rendering -------------------------------------------------------------------------


def png(response) -> Image.Image:
    import io

    return Image.open(io.BytesIO(b"".join(response.streaming_content)))


def test_preview_window_presets_and_headers(api, dicom_files, precedent_home):
    instance = store(dicom_files / CT)
    url = f"/api/v1/instances/{instance.sop_instance_uid}/preview.png"
    default = api.get(url)
    assert default.status_code == 200 and default["Content-Type"] == "image/png"
    assert png(default).size == (128, 128)
    assert "X-Window-Center" in default
    lung = api.get(url + "?preset=lung")
    assert (lung["X-Window-Center"], lung["X-Window-Width"]) == ("-600", "1500")
    custom = api.get(url + "?wc=40&ww=400&size=64")
    assert (custom["X-Window-Center"], custom["X-Window-Width"]) == ("40", "400")
    assert png(custom).size == (64, 64)
    assert list((precedent_home / "cache" / "render").rglob("*.png"))  # cached under PRECEDENT_HOME


def test_a_thumbnail_is_never_larger_than_256_px(api, dicom_files):
    """Thumbnails are not audited; a full-size image comes through preview.png, which is."""
    instance = store(dicom_files / "pydicom-test_files/JPEG2000.dcm")  # 1024 rows × 256 columns
    url = f"/api/v1/instances/{instance.sop_instance_uid}"
    assert png(api.get(f"{url}/thumbnail.png?size=8192&wc=64&ww=10")).size == (64, 256)
    assert png(api.get(f"{url}/thumbnail.png?size=128")).size == (32, 128)
    assert png(api.get(f"{url}/preview.png?size=8192")).size == (256, 1024)


def test_the_preview_of_an_enhanced_ct_is_windowed_in_hounsfield_units(api, dicom_files):
    # Its rescale and window live in the functional groups (tests/studies/test_dicom.py).
    instance = store(dicom_files / "pydicom-data/eCT_Supplemental.dcm")
    url = f"/api/v1/instances/{instance.sop_instance_uid}/preview.png"
    default = api.get(url)
    assert default.status_code == 200
    assert (default["X-Window-Center"], default["X-Window-Width"]) == ("49", "102")
    # The brain preset on HU: mostly air and bone around a head-sized phantom, not 36 % white.
    brain = np.asarray(png(api.get(url + "?preset=brain&frame=2")))
    assert (brain == 255).mean() < 0.1


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("?frame=2", "out of range 1..1"),
        ("?frame=0", "frame"),
        ("?preset=nope", "preset"),
        ("?wc=40", "together"),
        ("?wc=40&ww=0", "ww"),
        ("?size=100000", "size"),
    ],
)
def test_preview_bad_parameters_are_400(api, dicom_files, query, reason):
    instance = store(dicom_files / CT)
    response = api.get(f"/api/v1/instances/{instance.sop_instance_uid}/preview.png{query}")
    assert response.status_code == 400
    assert reason in response.json()["error"]


def test_preview_of_unknown_instance_and_of_a_report(api, dicom_files):
    assert api.get("/api/v1/instances/1.2.3.4/preview.png").status_code == 404
    report = store(dicom_files / "pydicom-test_files/test-SR.dcm")
    response = api.get(f"/api/v1/instances/{report.sop_instance_uid}/preview.png")
    assert response.status_code == 422 and "no image pixel data" in response.json()["error"]


def test_multiframe_preview_by_frame(api, dicom_files):
    instance = store(dicom_files / "pydicom-data/emri_small.dcm")
    url = f"/api/v1/instances/{instance.sop_instance_uid}/preview.png"
    first, tenth = png(api.get(url + "?frame=1&preset=full")), png(api.get(url + "?frame=10&preset=full"))
    assert first.tobytes() != tenth.tobytes()
    assert api.get(url + "?frame=11").status_code == 400


def test_instance_detail(api, dicom_files):
    instance = store(dicom_files / CT)
    body = api.get(f"/api/v1/instances/{instance.sop_instance_uid}/").json()
    assert body["modality"] == "CT" and body["study_instance_uid"] == instance.series.study.study_instance_uid
    assert body["sha256"] == instance.sha256


def test_raw_dicom_body_is_stored(api, dicom_files, precedent_home):
    data = (dicom_files / CT).read_bytes()
    response = api.generic(
        "POST", "/api/v1/instances/", data, content_type="application/dicom", HTTP_X_FILENAME="ct.dcm"
    )
    assert response.status_code == 201
    entry = response.json()["results"][0]
    assert entry["file"] == "ct.dcm" and entry["outcome"] == "stored"
    assert (precedent_home / Instance.objects.get().file_path).read_bytes() == data


def test_raw_gzip_body_is_unwrapped(api, dicom_files):
    data = (dicom_files / "pydicom-test_files/zipMR.gz").read_bytes()
    response = api.generic("POST", "/api/v1/instances/", data, content_type="application/dicom")
    assert response.status_code == 201
    assert Instance.objects.get().series.modality == "MR"


def test_raw_body_errors(api):
    assert api.generic("POST", "/api/v1/instances/", b"", content_type="application/dicom").status_code == 400
    chunked = api.generic(
        "POST", "/api/v1/instances/", b"", content_type="application/dicom", HTTP_TRANSFER_ENCODING="chunked"
    )
    assert chunked.status_code == 411 and "Content-Length" in chunked.json()["error"]
    response = api.generic("POST", "/api/v1/instances/", b"not dicom" * 50, content_type="application/dicom")
    assert response.status_code == 400 and "not a DICOM Part 10 file" in response.json()["error"]
    response = api.generic("POST", "/api/v1/instances/", b'{"a": 1}', content_type="application/json")
    assert response.status_code == 415 and "error" in response.json()


def test_same_dataset_under_another_file_meta_is_a_duplicate(api, make_dicom, precedent_home):
    """A C-STORE or a workstation re-export gives the same dataset a File Meta of its own."""
    import io

    first = make_dicom()
    ds = pydicom.dcmread(io.BytesIO(first))
    ds.file_meta.ImplementationVersionName = "OTHER_ROUTE_1"
    ds.file_meta.SourceApplicationEntityTitle = "MODALITY"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    again = buffer.getvalue()
    assert again != first

    assert api.post("/api/v1/instances/", {"file": upload("a.dcm", first)}, format="multipart").status_code == 201
    response = api.post("/api/v1/instances/", {"file": upload("b.dcm", again)}, format="multipart")
    assert response.status_code == 200 and response.json()["results"][0]["outcome"] == "duplicate"
    stored = Instance.objects.get()
    assert (precedent_home / stored.file_path).read_bytes() == first
    assert len(list((precedent_home / "dicom").rglob("*.dcm"))) == 1
    # The dataset hash was computed for this check, and kept on the stored row.
    assert stored.dataset_sha256 == storage.dataset_sha256(precedent_home / stored.file_path) != stored.sha256
    # Other pixels under that SOP UID are still a conflict, not a duplicate.
    ds.PixelData = bytes(len(ds.PixelData))
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    response = api.post("/api/v1/instances/", {"file": upload("c.dcm", buffer.getvalue())}, format="multipart")
    assert response.status_code == 409


def test_each_study_keeps_the_patient_details_its_images_give(api, make_dicom):
    """Two studies under one PatientID (a married name; anonymous studies without an ID)."""
    import io

    from pydicom.uid import generate_uid

    for name in ("Maiden^Anna", "Married^Anna"):
        data = make_dicom(PatientID="P-7", PatientName=name, StudyInstanceUID=generate_uid(),
                          SeriesInstanceUID=generate_uid())  # fmt: skip
        services.instance_ingest(source=io.BytesIO(data))
    assert Patient.objects.filter(patient_id="P-7").count() == 1
    names = {s["patient"]["name"] for s in api.get("/api/v1/studies/?patient_id=P-7").json()["results"]}
    assert names == {"Maiden^Anna", "Married^Anna"}


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/instances/%00/",
        "/api/v1/instances/1.2.3%00/preview.png",
        "/api/v1/studies/%00/",
        "/api/v1/studies/1.2'3/triage/",
        "/api/v1/instances/abc/overlays/",
        "/dicomweb/studies/%00/metadata",
    ],
)
def test_a_path_that_is_no_uid_is_a_json_404(api, path):
    """A UID in a path is digits and dots; anything else (a NUL byte would reach
    PostgreSQL as an error) is a 404 before a view runs, in JSON for API clients."""
    response = api.get(path)
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json" and response.json()["error"].startswith("not found: ")


def test_a_page_path_that_is_no_uid_is_404(browser_client):
    assert browser_client.get("/studies/%00/").status_code == 404


def test_too_many_files_in_one_request_is_a_json_400(api, dicom_files, settings, precedent_home):
    settings.DATA_UPLOAD_MAX_NUMBER_FILES = 3
    from django.test.client import encode_multipart

    data = (dicom_files / CT).read_bytes()

    body = encode_multipart("BOUNDARY", {"file": [_named(f"f{n}.dcm", data) for n in range(4)]})
    response = api.generic("POST", "/api/v1/instances/", body, content_type="multipart/form-data; boundary=BOUNDARY")
    assert response.status_code == 400
    assert response.json()["error"] == "too many files in one request: send at most 3 per request"
    assert not Instance.objects.exists()
    assert list((precedent_home / "tmp").iterdir()) == []  # nor the spools of the files before the 4th


def _named(name: str, data: bytes):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile(name, data, content_type="application/dicom")
