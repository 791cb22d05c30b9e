"""The de-identified export over REST and from the pages: real files in, a zip out."""

from __future__ import annotations

import csv
import io
import zipfile

import pydicom
import pytest
from rest_framework.test import APIClient

from access.models import AuditEvent

pytestmark = pytest.mark.django_db

URL = "/api/v1/exports/deid/"


def unzip(response) -> zipfile.ZipFile:
    body = b"".join(response.streaming_content) if response.streaming else response.content
    return zipfile.ZipFile(io.BytesIO(body))


def test_a_study_exports_as_a_de_identified_zip(api, mr_study, precedent_home):
    study = mr_study[0].series.study
    members = [i for i in mr_study if i.series.study_id == study.pk]
    response = api.post(URL, {"study_instance_uids": [study.study_instance_uid]}, format="json")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/zip"
    assert response["Content-Disposition"].startswith('attachment; filename="precedent-deid-')
    assert response["X-Export-Instances"] == str(len(members))
    archive = unzip(response)
    dicoms = [name for name in archive.namelist() if name.endswith(".dcm")]
    assert len(dicoms) == len(members)
    originals = {i.sop_instance_uid for i in members}
    datasets = []
    for name in dicoms:
        ds = pydicom.dcmread(io.BytesIO(archive.read(name)))
        study_uid, series_uid, file_name = name.split("/")
        assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, f"{ds.SOPInstanceUID}.dcm") == (
            study_uid,
            series_uid,
            file_name,
        )
        assert ds.SOPInstanceUID not in originals and ds.StudyInstanceUID.startswith("2.25.")
        assert ds.PatientIdentityRemoved == "YES" and "Doe" not in str(ds.PatientName)
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
        datasets.append(ds)
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    # Nothing identifying anywhere in the zip: no original UID, no name.
    everything = b"".join(archive.read(name) for name in archive.namelist())
    assert study.study_instance_uid.encode() not in everything
    assert b"Doe^Peter" not in everything
    manifest = list(csv.DictReader(io.StringIO(archive.read("manifest.csv").decode())))
    assert sum(int(row["instances"]) for row in manifest) == len(members)
    assert {row["series_instance_uid"] for row in manifest} == {ds.SeriesInstanceUID for ds in datasets}
    # Audited, and no temp file left.
    # The middleware's row for the request, plus ours with what was exported.
    event = AuditEvent.objects.get(action="export", outcome="ok", details__export="deid")
    assert event.details["instances"] == len(members) and event.username == "reader"
    assert list((precedent_home / "tmp").iterdir()) == []


def test_a_set_of_search_results_exports_consistently(api, mr_study):
    chosen = [mr_study[0], mr_study[1], mr_study[-1]]
    response = api.post(URL, {"sop_instance_uids": [i.sop_instance_uid for i in chosen]}, format="json")
    assert response.status_code == 200
    archive = unzip(response)
    assert len([n for n in archive.namelist() if n.endswith(".dcm")]) == 3
    studies = {n.split("/")[0] for n in archive.namelist() if n.endswith(".dcm")}
    assert len(studies) == len({i.series.study_id for i in chosen})


def test_unknown_uids_are_404(api, mr_study, precedent_home):
    response = api.post(URL, {"study_instance_uids": ["1.2.3.999"]}, format="json")
    assert response.status_code == 404
    assert "1.2.3.999" in response.json()["error"]
    response = api.post(URL, {"sop_instance_uids": [mr_study[0].sop_instance_uid, "1.2.3.4"]}, format="json")
    assert response.status_code == 404
    refusals = AuditEvent.objects.filter(action="export", outcome="error", details__export="deid")
    assert refusals.count() == 2 and "no instance data" in refusals.first().details["reason"]


def test_over_the_limit_and_empty_are_400(api, mr_study, settings, precedent_home):
    settings.PRECEDENT_EXPORT_MAX_INSTANCES = 1
    study = mr_study[0].series.study
    response = api.post(URL, {"study_instance_uids": [study.study_instance_uid]}, format="json")
    assert response.status_code == 400
    assert "over the export limit of 1" in response.json()["error"]
    assert api.post(URL, {}, format="json").status_code == 400
    assert list((precedent_home / "tmp").iterdir()) == []


def test_burned_in_annotation_is_left_out_and_said(api, dicom_files, ingest, make_dicom, tmp_path, precedent_home):
    def burned(ds):
        ds.BurnedInAnnotation = "YES"

    path = tmp_path / "burned.dcm"
    path.write_bytes(make_dicom(transform=burned))
    instance = ingest(path)
    response = api.post(URL, {"sop_instance_uids": [instance.sop_instance_uid]}, format="json")
    assert response.status_code == 400
    assert "burned-in annotation" in response.json()["error"]
    assert list((precedent_home / "tmp").iterdir()) == []


def test_authentication_and_role(mr_study, django_user_model):
    assert APIClient().post(URL, {"sop_instance_uids": ["1.2.3"]}, format="json").status_code == 401
    from rest_framework.authtoken.models import Token

    from access.services import role_grant

    tech = django_user_model.objects.create_user(username="tech", password="a-long-test-password")
    role_grant(user=tech, roles=["technologist"])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=tech).key}")
    response = client.post(URL, {"sop_instance_uids": [mr_study[0].sop_instance_uid]}, format="json")
    assert response.status_code == 403


def test_the_study_page_button_exports(browser_client, mr_study):
    study = mr_study[0].series.study
    page = browser_client.get(f"/studies/{study.study_instance_uid}/")
    assert b"Export de-identified" in page.content
    response = browser_client.post("/exports/deid/", {"export_study": study.study_instance_uid})
    assert response.status_code == 200 and response["Content-Type"] == "application/zip"
    assert any(name.endswith(".dcm") for name in unzip(response).namelist())
    refused = browser_client.post("/exports/deid/", {"export_study": "1.2.3.999"})
    assert refused.status_code == 404 and b"1.2.3.999" in refused.content
