"""DICOMweb end to end: dicomweb-client against a live server, on real files.

STOW-RS, QIDO-RS and WADO-RS as an integrator drives them, plus the bad input the
standard names (malformed multipart, wrong media types, unknown keys, bad values) and
authentication. Raw `requests` calls where dicomweb-client hides the status or header.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image
from pydicom.uid import generate_uid
from rest_framework.test import APIClient

from studies.models import Instance, Study
from tests.dicomweb.conftest import BROKEN, CT, J2K, MR, MULTIFRAME, REPORT

pytestmark = pytest.mark.django_db(transaction=True)

STOW_TYPE = 'multipart/related; type="application/dicom"; boundary={boundary}'


def multipart(*parts: bytes, boundary: str = "test-boundary-1", part_type: str = "application/dicom") -> bytes:
    body = b"".join(f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode() + part + b"\r\n" for part in parts)
    return body + f"--{boundary}--\r\n".encode()


def stow(base_url: str, auth: dict, body: bytes, *, path: str = "/studies", content_type: str | None = None):
    headers = {**auth, "Content-Type": content_type or STOW_TYPE.format(boundary="test-boundary-1")}
    return requests.post(base_url + path, data=body, headers=headers, timeout=60)


def values(dataset: dict, tag: str) -> list:
    return dataset.get(tag, {}).get("Value", [])


def uids(datasets: list[dict], tag: str) -> set[str]:
    return {values(d, tag)[0] for d in datasets}


STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"


# --- authentication ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/studies"),
        ("post", "/studies"),
        ("get", "/series"),
        ("get", "/instances"),
        ("get", "/studies/1.2.3"),
        ("get", "/studies/1.2.3/metadata"),
        ("get", "/studies/1.2.3/series/4.5/instances/6.7/frames/1"),
        ("get", "/studies/1.2.3/series/4.5/instances/6.7/rendered"),
    ],
)
def test_every_route_needs_authentication(base_url, method, path):
    response = getattr(requests, method)(base_url + path, timeout=30)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Token")
    assert "credentials" in response.json()["error"].lower()


def test_a_browser_session_works_too(browser_client, stored):
    response = browser_client.get("/dicomweb/studies?PatientID=1CT1")
    assert response.status_code == 200
    assert len(response.json()) == 1


def test_a_wrong_token_is_401(base_url):
    response = requests.get(base_url + "/studies", headers={"Authorization": "Token nope"}, timeout=30)
    assert response.status_code == 401


# --- STOW-RS -------------------------------------------------------------------------------


def test_store_instances_answers_the_store_response(dw, read, base_url):
    datasets = [read(name) for name in (CT, MR, MULTIFRAME, J2K)]
    response = dw.store_instances(datasets)
    referenced = response.ReferencedSOPSequence
    assert [item.ReferencedSOPInstanceUID for item in referenced] == [ds.SOPInstanceUID for ds in datasets]
    assert [item.ReferencedSOPClassUID for item in referenced] == [ds.SOPClassUID for ds in datasets]
    ct = datasets[0]
    # dicomweb-client sends Host without the port, so compare the path of the URLs.
    assert referenced[0].RetrieveURL.endswith(
        f"/dicomweb/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}/instances/{ct.SOPInstanceUID}"
    )
    assert "FailedSOPSequence" not in response
    assert Instance.objects.count() == 4
    assert Study.objects.get(study_instance_uid=ct.StudyInstanceUID).patient.patient_id == "1CT1"


def test_duplicates_are_successes(dw, read, base_url, auth, dicom_files):
    dw.store_instances([read(CT)])
    again = stow(base_url, auth, multipart((dicom_files / CT).read_bytes()))
    assert again.status_code == 200
    body = again.json()
    assert values(body["00081199"]["Value"][0], "00081155") == [read(CT).SOPInstanceUID]
    assert "00081198" not in body
    assert values(body, "00081190")[0].endswith(f"/dicomweb/studies/{read(CT).StudyInstanceUID}")
    assert Instance.objects.count() == 1


def test_some_failed_is_202_with_reasons(base_url, auth, dicom_files):
    broken = (dicom_files / BROKEN).read_bytes()
    response = stow(base_url, auth, multipart((dicom_files / CT).read_bytes(), b"not dicom at all" * 20, broken))
    assert response.status_code == 202
    assert response.headers["Content-Type"] == "application/dicom+json"
    body = response.json()
    assert len(body["00081199"]["Value"]) == 1
    failed = body["00081198"]["Value"]
    assert [values(f, "00081197") for f in failed] == [[0xC000], [0xA900]]  # cannot understand; not its SOP class
    assert values(failed[1], "00081155") == [pydicom.dcmread(dicom_files / BROKEN).SOPInstanceUID]
    assert values(failed[0], "00081155") == []  # junk names no instance
    warning = response.headers["Warning"]
    assert "part 2 was not stored (0xC000): not a DICOM Part 10 file" in warning
    assert "Pixel Data is" in warning
    assert Instance.objects.count() == 1


def test_all_failed_is_409(base_url, auth, dicom_files):
    response = stow(base_url, auth, multipart((dicom_files / BROKEN).read_bytes()))
    assert response.status_code == 409
    assert values(response.json()["00081198"]["Value"][0], "00081197") == [0xA900]
    assert Instance.objects.count() == 0


def test_other_bytes_under_a_stored_uid_fail_as_duplicate_instance(base_url, auth, make_dicom):
    first = make_dicom()
    uid = pydicom.dcmread(io.BytesIO(first)).SOPInstanceUID
    assert stow(base_url, auth, multipart(first)).status_code == 200
    response = stow(base_url, auth, multipart(make_dicom(SOPInstanceUID=uid, PatientName="Other^Name")))
    assert response.status_code == 409
    failed = response.json()["00081198"]["Value"][0]
    assert values(failed, "00081197") == [0x0111] and values(failed, "00081155") == [uid]
    assert "already stored with different content" in response.headers["Warning"]


def test_unsupported_transfer_syntax_fails_with_c122(base_url, auth, dicom_files):
    ds = pydicom.dcmread(dicom_files / J2K)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    response = stow(base_url, auth, multipart(buffer.getvalue()))
    assert response.status_code == 409
    assert values(response.json()["00081198"]["Value"][0], "00081197") == [0xC122]


def test_store_into_a_study_refuses_parts_of_other_studies(dw, base_url, auth, make_dicom, read):
    ct = read(CT)
    other = make_dicom(StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid())
    same = make_dicom()  # CT_small's study, a fresh instance
    response = stow(base_url, auth, multipart(other, same), path=f"/studies/{ct.StudyInstanceUID}")
    assert response.status_code == 202
    body = response.json()
    failed = body["00081198"]["Value"][0]
    assert values(failed, "00081197") == [0xC409]
    assert values(failed, "00081155") == [pydicom.dcmread(io.BytesIO(other)).SOPInstanceUID]
    assert values(body, "00081190")[0].endswith(f"/studies/{ct.StudyInstanceUID}")
    assert f"is not the study {ct.StudyInstanceUID}" in response.headers["Warning"]
    assert Study.objects.count() == 1
    # dicomweb-client's study-targeted store works the same way.
    stored = dw.store_instances([read(CT)], study_instance_uid=ct.StudyInstanceUID)
    assert stored.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ct.SOPInstanceUID


@pytest.mark.parametrize(
    ("content_type", "body", "status", "reason"),
    [
        ("application/json", b"{}", 415, "Content-Type application/json is not supported"),
        ("application/dicom", b"DICM", 415, 'send multipart/related; type="application/dicom"'),
        ('multipart/related; type="application/dicom+json"; boundary=x', b"", 415, "metadata and bulk data"),
        ("multipart/form-data; boundary=x", b"", 415, "multipart/form-data is not supported"),
        (None, b"", 415, "is not supported: send multipart/related"),
        ('multipart/related; type="application/dicom"', b"--x--", 400, "no boundary parameter"),
        (STOW_TYPE.format(boundary="elsewhere"), b"no boundary in here", 400, "does not contain the boundary"),
        (STOW_TYPE.format(boundary="b"), b"--b\r\nContent-Type: application/dicom\r\n\r\nDICM", 400, "ends before"),
        (STOW_TYPE.format(boundary="b"), b"--b\r\nContent-Type application/dicom\r\n\r\nx\r\n--b--", 400, "header"),
        (STOW_TYPE.format(boundary="b"), b"--b--\r\n", 400, "holds no parts"),
        (STOW_TYPE.format(boundary="b"), b"--bjunk\r\n", 400, "not followed by CRLF"),
    ],
)
def test_malformed_or_wrong_media_type_is_rejected_with_a_reason(base_url, auth, content_type, body, status, reason):
    headers = {**auth, **({"Content-Type": content_type} if content_type else {})}
    response = requests.post(base_url + "/studies", data=body, headers=headers, timeout=30)
    assert response.status_code == status
    assert reason in response.json()["error"]
    assert Instance.objects.count() == 0


def test_a_truncated_body_after_stored_parts_says_what_was_stored(base_url, auth, dicom_files):
    body = multipart((dicom_files / CT).read_bytes())[: -len(b"--test-boundary-1--\r\n")]
    body += b"--test-boundary-1\r\nContent-Type: application/dicom\r\n\r\n" + (dicom_files / MR).read_bytes()[:500]
    response = stow(base_url, auth, body)
    assert response.status_code == 400
    assert "ends before the closing boundary (the 1 instance(s) before it were stored)" in response.json()["error"]
    assert Instance.objects.count() == 1


def test_a_body_cut_inside_a_large_part_stores_the_parts_before_it(base_url, auth, dicom_files, settings):
    """The cut falls past the first MiB of a part, so the store is reading the part when
    the body ends: the parts before it are stored (they share its batch), the cut part
    leaves no file behind, and the request fails with the defect."""
    large = pydicom.dcmread(dicom_files / CT)
    large.SOPInstanceUID = generate_uid()
    large.Rows = large.Columns = 1024
    large.PixelData = np.zeros((1024, 1024), dtype=np.int16).tobytes()
    buffer = io.BytesIO()
    large.save_as(buffer, enforce_file_format=True)
    body = multipart((dicom_files / CT).read_bytes(), (dicom_files / MR).read_bytes())
    body = body[: -len(b"--test-boundary-1--\r\n")]
    body += b"--test-boundary-1\r\nContent-Type: application/dicom\r\n\r\n" + buffer.getvalue()[: 3 * 1024 * 1024 // 2]
    response = stow(base_url, auth, body)
    assert response.status_code == 400
    assert "ends before the closing boundary (the 2 instance(s) before it were stored)" in response.json()["error"]
    assert Instance.objects.count() == 2
    home = settings.PRECEDENT_HOME
    assert len(list((home / "dicom").rglob("*.dcm"))) == 2
    assert list((home / "tmp").iterdir()) == []


def test_a_part_of_another_type_fails_alone(base_url, auth, dicom_files):
    body = (
        b"--b\r\nContent-Type: image/jpeg\r\n\r\n\xff\xd8\xff\r\n"
        + b"--b\r\nContent-Type: application/dicom\r\n\r\n"
        + (dicom_files / CT).read_bytes()
        + b"\r\n--b--"
    )
    response = stow(base_url, auth, body, content_type=STOW_TYPE.format(boundary="b"))
    assert response.status_code == 202
    assert values(response.json()["00081198"]["Value"][0], "00081197") == [0xC000]
    assert "part Content-Type is image/jpeg" in response.headers["Warning"]


def test_stow_over_the_upload_limit_is_413(base_url, auth, dicom_files, settings):
    settings.PRECEDENT_MAX_UPLOAD_BYTES = 10_000
    response = stow(base_url, auth, multipart((dicom_files / CT).read_bytes()))
    assert response.status_code == 413 and "upload limit" in response.json()["error"]


def test_a_chunked_body_needs_a_server_that_decodes_it(base_url, auth, dicom_files):
    """Django's development server cannot read chunked bodies; gunicorn can (the
    parity run stores through gunicorn with chunked bodies)."""
    body = multipart((dicom_files / CT).read_bytes())
    headers = {**auth, "Content-Type": STOW_TYPE.format(boundary="test-boundary-1")}
    response = requests.post(base_url + "/studies", data=iter([body]), headers=headers, timeout=30)
    assert response.status_code == 411
    assert "chunked" in response.json()["error"]


def test_stow_answers_json_only(base_url, auth, dicom_files):
    headers = {
        **auth,
        "Content-Type": STOW_TYPE.format(boundary="test-boundary-1"),
        "Accept": "application/dicom+xml",
    }
    response = requests.post(
        base_url + "/studies", data=multipart((dicom_files / CT).read_bytes()), headers=headers, timeout=30
    )
    assert response.status_code == 406 and "application/dicom+json" in response.json()["error"]


# --- QIDO-RS -------------------------------------------------------------------------------


@pytest.fixture
def archive(dw, make_dicom, read, stored):
    """The four stored files plus three CT studies with accession numbers and dates."""
    extra = []
    for number, (date, time) in enumerate([("20240105", "081500"), ("20240220", "143000"), ("20231231", "235959")]):
        data = make_dicom(
            StudyInstanceUID=generate_uid(),
            SeriesInstanceUID=generate_uid(),
            PatientID=f"QIDO-{number}",
            PatientName=f"Qido^Patient{number}",
            AccessionNumber=f"ACC-{number}",
            StudyDate=date,
            StudyTime=time,
        )
        extra.append(pydicom.dcmread(io.BytesIO(data)))
    dw.store_instances(extra)
    return {**stored, "extra": extra}


def test_search_for_studies_returns_the_required_attributes(dw, archive):
    studies = dw.search_for_studies()
    assert len(studies) == 7
    ct = next(s for s in studies if values(s, "00100020") == ["1CT1"])
    required = {
        "00080020": ["20040119"],
        "00080030": ["072730"],
        "00080056": ["ONLINE"],
        "00080061": ["CT"],
        "00100010": [{"Alphabetic": "CompressedSamples^CT1"}],
        "00100040": ["O"],
        "0020000D": [archive[CT].StudyInstanceUID],
        "00200010": ["1CT1"],
        "00201206": [1],
        "00201208": [1],
    }
    for tag, expected in required.items():
        assert values(ct, tag) == expected, tag
    for tag in ("00080050", "00080090", "00100030"):  # empty in the file: present, no Value
        assert ct[tag] == {"vr": {"00080050": "SH", "00080090": "PN", "00100030": "DA"}[tag]}
    assert values(ct, "00081190")[0].endswith(f"/dicomweb/studies/{archive[CT].StudyInstanceUID}")


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"PatientID": "1CT1"}, {"1CT1"}),
        ({"00100020": "4MR1"}, {"4MR1"}),
        ({"0010,0020": "4MR1"}, {"4MR1"}),
        ({"PatientID": "1ct1"}, set()),  # IDs match literally
        ({"PatientName": "CompressedSamples*"}, {"1CT1", "4MR1", "8NM1"}),
        ({"PatientName": "compressedsamples^?r1"}, {"4MR1"}),  # names case-insensitively
        ({"PatientName": "*^CT1"}, {"1CT1"}),
        ({"PatientName": "Qido^Patient1"}, {"QIDO-1"}),
        ({"PatientName": "qido^patient1"}, {"QIDO-1"}),
        ({"StudyDate": "20040826"}, {"4MR1", "8NM1"}),
        ({"StudyDate": "20240101-20240331"}, {"QIDO-0", "QIDO-1"}),
        ({"StudyDate": "-20031231"}, {""}),  # emri_small, 20000101, has no patient ID
        ({"StudyDate": "20231231-"}, {"QIDO-0", "QIDO-1", "QIDO-2"}),
        ({"StudyDate": "20240105", "StudyTime": "08-09"}, {"QIDO-0"}),
        ({"StudyTime": "143000"}, {"QIDO-1"}),
        ({"StudyTime": "2300-"}, {"QIDO-2"}),
        ({"ModalitiesInStudy": "NM"}, {"8NM1"}),
        ({"ModalitiesInStudy": "NM,MR"}, {"8NM1", "4MR1", ""}),
        ({"AccessionNumber": "ACC-2"}, {"QIDO-2"}),
        ({"AccessionNumber": "ACC-*"}, {"QIDO-0", "QIDO-1", "QIDO-2"}),
        ({"PatientID": "QIDO-1", "AccessionNumber": "ACC-2"}, set()),
    ],
)
def test_study_matching(dw, archive, filters, expected):
    studies = dw.search_for_studies(search_filters=filters)
    assert {(values(s, "00100020") or [""])[0] for s in studies} == expected


def test_study_instance_uid_list_matching(dw, archive):
    ct, mr = archive[CT].StudyInstanceUID, archive[MR].StudyInstanceUID
    assert uids(dw.search_for_studies(search_filters={"StudyInstanceUID": f"{ct},{mr}"}), STUDY_UID) == {ct, mr}
    assert uids(dw.search_for_studies(search_filters={"StudyInstanceUID": f"{ct}\\{mr}"}), STUDY_UID) == {ct, mr}
    repeated = dw.search_for_studies(additional_params={"StudyInstanceUID": [ct, mr]})
    assert uids(repeated, STUDY_UID) == {ct, mr}


def test_limit_offset_and_paging(dw, archive):
    everything = dw.search_for_studies()
    first = dw.search_for_studies(limit=3)
    rest = dw.search_for_studies(limit=3, offset=3)
    last = dw.search_for_studies(offset=6)
    assert [values(s, STUDY_UID) for s in first + rest + last] == [values(s, STUDY_UID) for s in everything]
    assert len(first) == 3 and len(last) == 1
    assert dw.search_for_studies(offset=100) == []
    assert len(dw.search_for_studies(limit=2, get_remaining=True)) == 7


def test_the_server_maximum_is_announced(dw, archive, base_url, auth, monkeypatch):
    from dicomweb import views

    monkeypatch.setattr(views, "MAX_RESULTS", 2)
    response = requests.get(base_url + "/studies", headers=auth, timeout=30)
    assert len(response.json()) == 2
    assert "The number of results exceeded the maximum supported by the server" in response.headers["Warning"]
    asked = requests.get(base_url + "/studies?limit=2", headers=auth, timeout=30)
    assert "Warning" not in asked.headers  # the client's own limit: nothing to announce


def test_includefield(dw, archive):
    plain = dw.search_for_studies(search_filters={"PatientID": "1CT1"})[0]
    assert "00081030" not in plain and "00080080" not in plain
    by_keyword = dw.search_for_studies(search_filters={"PatientID": "1CT1"}, fields=["StudyDescription"])[0]
    assert values(by_keyword, "00081030") == [archive[CT].StudyDescription]
    by_tag = dw.search_for_studies(search_filters={"PatientID": "1CT1"}, fields=["00080080"])[0]
    assert values(by_tag, "00080080") == [archive[CT].InstitutionName]
    everything = dw.search_for_studies(search_filters={"PatientID": "1CT1"}, fields=["all"])[0]
    assert {"00081030", "00080080", "00100021"} <= set(everything)
    assert "00080018" not in everything  # instance attributes are not study attributes
    instances = dw.search_for_instances(search_filters={"PatientID": "1CT1"}, fields=["PhotometricInterpretation"])
    assert values(instances[0], "00280004") == ["MONOCHROME2"]


def test_unknown_keys_are_ignored_with_a_warning(base_url, auth, archive):
    response = requests.get(
        base_url + "/studies",
        params={
            "PatientID": "1CT1",
            "Foo": "bar",
            "fuzzymatching": "true",
            "OperatorsName": "X",
            "00081032.00080100": "1",
        },
        headers=auth,
        timeout=30,
    )
    assert response.status_code == 200
    assert len(response.json()) == 1
    warning = response.headers["Warning"]
    assert warning.startswith("299 http://")
    assert '"Foo is not a DICOM attribute or query parameter; ignored"' in warning
    assert "The fuzzymatching parameter is not supported. Only literal matching has been performed." in warning
    assert "OperatorsName is not supported for matching at the study level" in warning
    assert "Sequence matching" in warning
    # An instance-level key at the study level is not a study attribute.
    deeper = requests.get(base_url + "/studies?SOPInstanceUID=1.2.3", headers=auth, timeout=30)
    assert len(deeper.json()) == 7 and "SOPInstanceUID is not supported" in deeper.headers["Warning"]


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("StudyDate=2024", "is not a DICOM date"),
        ("StudyDate=20240230", "is not a valid date"),
        ("StudyDate=20240301-20240101", "starts after it ends"),
        ("StudyDate=-", "needs a start, an end or both"),
        ("StudyTime=25", "is not a valid time"),
        ("StudyTime=10:30", "is not a DICOM time"),
        ("limit=-1", "limit must be a non-negative integer"),
        ("offset=x", "offset must be a non-negative integer"),
        ("StudyInstanceUID=1.2.*", "is not a UID"),
        ("PatientID=a&PatientID=b", "given more than once"),
        ("00201208=many", "must be an integer"),
    ],
)
def test_invalid_values_are_400_with_a_reason(base_url, auth, query, reason):
    response = requests.get(f"{base_url}/studies?{query}", headers=auth, timeout=30)
    assert response.status_code == 400
    assert reason in response.json()["error"]


def test_no_match_is_200_with_an_empty_array(base_url, auth, archive):
    response = requests.get(base_url + "/studies?PatientID=nobody", headers=auth, timeout=30)
    assert response.status_code == 200 and response.json() == []
    assert response.headers["Content-Type"] == "application/dicom+json"


def test_search_accepts_json_and_refuses_xml(base_url, auth, archive):
    as_json = requests.get(base_url + "/studies", headers={**auth, "Accept": "application/json"}, timeout=30)
    assert as_json.status_code == 200 and as_json.headers["Content-Type"] == "application/json"
    xml = requests.get(
        base_url + "/studies", headers={**auth, "Accept": 'multipart/related; type="application/dicom+xml"'}, timeout=30
    )
    assert xml.status_code == 406 and "XML" in xml.json()["error"]


def test_search_for_series(dw, archive):
    ct = archive[CT]
    in_study = dw.search_for_series(ct.StudyInstanceUID)
    assert uids(in_study, SERIES_UID) == {ct.SeriesInstanceUID}
    series = in_study[0]
    assert values(series, "00080060") == ["CT"] and values(series, "00201209") == [1]
    assert values(series, "00200011") == [ct.SeriesNumber]
    assert values(series, "00081190")[0].endswith(f"/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}")
    assert "00100020" not in series  # the study is in the URL: no study attributes
    everywhere = dw.search_for_series(search_filters={"Modality": "MR"})
    assert uids(everywhere, SERIES_UID) == {archive[MR].SeriesInstanceUID, archive[MULTIFRAME].SeriesInstanceUID}
    assert all("0020000D" in s and "00201206" in s for s in everywhere)  # across studies: study attributes too
    by_patient = dw.search_for_series(search_filters={"PatientID": "4MR1"})
    assert uids(by_patient, SERIES_UID) == {archive[MR].SeriesInstanceUID}
    assert dw.search_for_series("9.9.9") == []


def test_search_for_instances(dw, archive):
    ct, multiframe, j2k = archive[CT], archive[MULTIFRAME], archive[J2K]
    in_series = dw.search_for_instances(ct.StudyInstanceUID, ct.SeriesInstanceUID)
    assert uids(in_series, SOP_UID) == {ct.SOPInstanceUID}
    instance = in_series[0]
    assert values(instance, "00080016") == [ct.SOPClassUID]
    assert (values(instance, "00280010"), values(instance, "00280011"), values(instance, "00280100")) == (
        [128],
        [128],
        [16],
    )
    assert "0020000E" not in instance and "0020000D" not in instance  # both in the URL
    in_study = dw.search_for_instances(multiframe.StudyInstanceUID)
    assert values(in_study[0], "00280008") == [10] and "0020000E" in in_study[0]
    by_class = dw.search_for_instances(search_filters={"SOPClassUID": j2k.SOPClassUID})
    assert uids(by_class, SOP_UID) == {j2k.SOPInstanceUID}
    everything = dw.search_for_instances()
    assert len(everything) == 7 and all("0020000D" in i and "0020000E" in i for i in everything)
    by_uid = dw.search_for_instances(search_filters={"SOPInstanceUID": ct.SOPInstanceUID})
    assert uids(by_uid, SOP_UID) == {ct.SOPInstanceUID}


def test_an_instance_without_pixels_has_no_image_attributes(dw, read):
    report = read(REPORT)
    dw.store_instances([report])
    instance = dw.search_for_instances(search_filters={"SOPInstanceUID": report.SOPInstanceUID})[0]
    assert instance["00280008"] == {"vr": "IS"} and instance["00280010"] == {"vr": "US"}


# --- WADO-RS -------------------------------------------------------------------------------


def test_retrieve_instance_series_and_study(dw, stored, dicom_files):
    ct = stored[CT]
    instance = dw.retrieve_instance(ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID)
    assert instance.SOPInstanceUID == ct.SOPInstanceUID
    buffer = io.BytesIO()
    instance.save_as(buffer, enforce_file_format=True)
    assert buffer.getvalue() == (dicom_files / CT).read_bytes()  # the stored file, byte for byte
    assert [ds.SOPInstanceUID for ds in dw.retrieve_series(ct.StudyInstanceUID, ct.SeriesInstanceUID)] == [
        ct.SOPInstanceUID
    ]
    j2k = stored[J2K]
    study = dw.retrieve_study(j2k.StudyInstanceUID, media_types=(("application/dicom", "*"),))
    assert [ds.file_meta.TransferSyntaxUID for ds in study] == [j2k.file_meta.TransferSyntaxUID]  # as stored


def test_retrieve_streams_multipart_with_part_headers(base_url, auth, stored):
    ct = stored[CT]
    response = requests.get(f"{base_url}/studies/{ct.StudyInstanceUID}", headers=auth, timeout=30)
    assert response.status_code == 200
    content_type = response.headers["Content-Type"]
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    boundary = content_type.rsplit("boundary=", 1)[1]
    assert response.content.startswith(f"--{boundary}\r\nContent-Type: application/dicom; transfer-syntax=".encode())
    assert response.content.endswith(f"--{boundary}--\r\n".encode())
    assert b"Content-Location: http://" in response.content


def test_retrieve_refuses_a_transfer_syntax_it_would_have_to_transcode(base_url, auth, stored):
    j2k = stored[J2K]
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'
    response = requests.get(
        f"{base_url}/studies/{j2k.StudyInstanceUID}", headers={**auth, "Accept": accept}, timeout=30
    )
    assert response.status_code == 406 and "sent as stored" in response.json()["error"]
    stored_syntax = accept.replace("1.2.840.10008.1.2.1", str(j2k.file_meta.TransferSyntaxUID))
    ok = requests.get(
        f"{base_url}/studies/{j2k.StudyInstanceUID}", headers={**auth, "Accept": stored_syntax}, timeout=30
    )
    assert ok.status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/studies/9.9.9",
        "/studies/9.9.9/metadata",
        "/studies/{study}/series/9.9.9",
        "/studies/{study}/series/{series}/instances/9.9.9",
        "/studies/{study}/series/{series}/instances/9.9.9/frames/1",
        "/studies/{study}/series/{series}/instances/9.9.9/rendered",
        "/studies/{other}/series/{series}/instances/{instance}",  # exists, but not in that study
        "/studies/not-a-uid",
    ],
)
def test_unknown_uids_are_404(base_url, auth, stored, path):
    ct, mr = stored[CT], stored[MR]
    url = base_url + path.format(
        study=ct.StudyInstanceUID, series=ct.SeriesInstanceUID, instance=ct.SOPInstanceUID, other=mr.StudyInstanceUID
    )
    assert requests.get(url, headers=auth, timeout=30).status_code == 404


def test_instance_metadata(dw, stored, base_url, auth):
    ct = stored[CT]
    metadata = dw.retrieve_instance_metadata(ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID)
    assert values(metadata, "00100010") == [{"Alphabetic": "CompressedSamples^CT1"}]
    assert values(metadata, "00280030") == [float(v) for v in ct.PixelSpacing]
    assert values(metadata, "00083002") == ["1.2.840.10008.1.2.1"]
    assert not any(tag.startswith("0002") for tag in metadata)  # no File Meta
    pixel = metadata["7FE00010"]
    assert pixel["vr"] == "OW" and "Value" not in pixel and "InlineBinary" not in pixel
    assert pixel["BulkDataURI"].endswith(f"/instances/{ct.SOPInstanceUID}/bulk/7FE00010")
    # The BulkDataURI answers (with the Host the client sent, so fetch by path).
    path = pixel["BulkDataURI"].split("/dicomweb", 1)[1]
    bulk = dw.retrieve_bulkdata(base_url + path)
    assert bulk == [ct.PixelData]
    # The metadata reads back into the same dataset (dicomweb-client's own use of it).
    restored = pydicom.Dataset.from_json(metadata, bulk_data_uri_handler=lambda *_: b"")
    assert restored.PatientID == ct.PatientID and restored.Rows == ct.Rows
    missing = requests.get(f"{base_url}/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}/instances/"
                           f"{ct.SOPInstanceUID}/bulk/00100010", headers=auth, timeout=30)  # fmt: skip
    assert missing.status_code == 404 and "not a top-level binary value" in missing.json()["error"]


def test_study_and_series_metadata(dw, stored, make_dicom):
    ct = stored[CT]
    dw.store_instances([pydicom.dcmread(io.BytesIO(make_dicom(InstanceNumber=2)))])
    study = dw.retrieve_study_metadata(ct.StudyInstanceUID)
    assert len(study) == 2 and {values(d, "00200013")[0] for d in study} == {1, 2}
    series = dw.retrieve_series_metadata(ct.StudyInstanceUID, ct.SeriesInstanceUID)
    assert len(series) == 2


def test_native_frames(dw, stored):
    ct, multiframe = stored[CT], stored[MULTIFRAME]
    (frame,) = dw.retrieve_instance_frames(ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID, [1])
    assert frame == ct.PixelData
    frames = dw.retrieve_instance_frames(
        multiframe.StudyInstanceUID, multiframe.SeriesInstanceUID, multiframe.SOPInstanceUID, [2, 5]
    )
    pixels = multiframe.pixel_array
    assert [np.frombuffer(f, dtype="<u2").reshape(64, 64).tolist() for f in frames] == [
        pixels[1].tolist(),
        pixels[4].tolist(),
    ]


def test_compressed_frames_decoded_or_as_stored(dw, stored):
    from pydicom.encaps import get_frame

    j2k = stored[J2K]
    uids_ = (j2k.StudyInstanceUID, j2k.SeriesInstanceUID, j2k.SOPInstanceUID)
    (native,) = dw.retrieve_instance_frames(*uids_, [1])
    assert np.frombuffer(native, dtype="<i2").reshape(1024, 256).tolist() == j2k.pixel_array.tolist()
    (compressed,) = dw.retrieve_instance_frames(*uids_, [1], media_types=("image/jp2",))
    assert compressed == get_frame(j2k.PixelData, 0, number_of_frames=1)


@pytest.mark.parametrize(
    ("frames", "accept", "status", "reason"),
    [
        ("11", None, 404, "frame 11 does not exist"),
        ("0", None, 404, "frame 0 does not exist"),
        ("1,x", None, 400, "positive integers"),
        ("1", 'multipart/related; type="image/jpeg"', 406, '"application/octet-stream"'),
        ("1", "image/png", 406, "frames are available as"),
    ],
)
def test_bad_frame_requests(base_url, auth, stored, frames, accept, status, reason):
    mf = stored[MULTIFRAME]
    url = f"{base_url}/studies/{mf.StudyInstanceUID}/series/{mf.SeriesInstanceUID}/instances/{mf.SOPInstanceUID}"
    headers = {**auth, **({"Accept": accept} if accept else {})}
    response = requests.get(f"{url}/frames/{frames}", headers=headers, timeout=30)
    assert response.status_code == status
    assert reason in response.json()["error"]


def test_rendered(dw, stored):
    ct = stored[CT]
    uids_ = (ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID)
    jpeg = Image.open(io.BytesIO(dw.retrieve_instance_rendered(*uids_)))
    assert jpeg.format == "JPEG" and jpeg.size == (128, 128)
    png = Image.open(io.BytesIO(dw.retrieve_instance_rendered(*uids_, media_types=("image/png",))))
    assert png.format == "PNG" and png.size == (128, 128)
    small = dw.retrieve_instance_rendered(*uids_, params={"viewport": "64,64", "window": "40,400,linear"})
    assert Image.open(io.BytesIO(small)).size == (64, 64)
    mf = stored[MULTIFRAME]
    mf_uids = (mf.StudyInstanceUID, mf.SeriesInstanceUID, mf.SOPInstanceUID)
    second = dw.retrieve_instance_frames_rendered(
        *mf_uids, [2], media_types=("image/png",), params={"window": "0,1000"}
    )
    tenth = dw.retrieve_instance_frames_rendered(
        *mf_uids, [10], media_types=("image/png",), params={"window": "0,1000"}
    )
    assert Image.open(io.BytesIO(second)).tobytes() != Image.open(io.BytesIO(tenth)).tobytes()


@pytest.mark.parametrize(
    ("suffix", "accept", "status", "reason"),
    [
        ("/rendered", "image/gif", 406, "image/jpeg or image/png"),
        ("/rendered?window=40", None, 400, "center,width"),
        ("/rendered?window=40,0", None, 400, "must be positive"),
        ("/rendered?quality=0", None, 400, "quality"),
        ("/rendered?viewport=0,10", None, 400, "viewport"),
        ("/frames/1,1/rendered", None, 400, "one frame"),
        ("/frames/2/rendered", None, 404, "frame 2 does not exist"),
    ],
)
def test_bad_rendered_requests(base_url, auth, stored, suffix, accept, status, reason):
    ct = stored[CT]
    url = f"{base_url}/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}/instances/{ct.SOPInstanceUID}"
    headers = {**auth, **({"Accept": accept} if accept else {})}
    response = requests.get(url + suffix, headers=headers, timeout=30)
    assert response.status_code == status
    assert reason in response.json()["error"]


def test_rendered_accept_query_parameter(base_url, auth, stored):
    ct = stored[CT]
    url = f"{base_url}/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}/instances/{ct.SOPInstanceUID}"
    response = requests.get(url + "/rendered?accept=image/png", headers={**auth, "Accept": "image/jpeg"}, timeout=30)
    assert response.headers["Content-Type"] == "image/png"


def test_a_report_has_no_frames_or_rendering(dw, read, base_url, auth):
    report = read(REPORT)
    dw.store_instances([report])
    url = (
        f"{base_url}/studies/{report.StudyInstanceUID}/series/{report.SeriesInstanceUID}"
        f"/instances/{report.SOPInstanceUID}"
    )
    for suffix in ("/frames/1", "/rendered"):
        response = requests.get(url + suffix, headers=auth, timeout=30)
        assert response.status_code == 404 and "no pixel data" in response.json()["error"]
    metadata = dw.retrieve_instance_metadata(report.StudyInstanceUID, report.SeriesInstanceUID, report.SOPInstanceUID)
    assert "0040A730" in metadata  # the content tree, as nested DICOM JSON
    assert json.loads(json.dumps(metadata)) == metadata


def test_rest_api_and_dicomweb_see_the_same_archive(dw, read):
    """What STOW-RS stores is what the REST API lists: one ingest service."""
    dw.store_instances([read(CT)])
    client = APIClient()
    from rest_framework.authtoken.models import Token

    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.get().key}")
    body = client.get("/api/v1/studies/").json()
    assert body["count"] == 1 and body["results"][0]["patient"]["patient_id"] == "1CT1"


@pytest.mark.django_db
def test_large_binary_values_in_metadata_need_the_download_permission(dicom_files, django_user_model, user):
    """Metadata needs read; a waveform, an overlay or an encapsulated document beyond a
    small size needs download, as the file does. Without it, it comes as a BulkDataURI
    that refuses; with it, inline as before, and the URI of a top-level value answers."""
    import base64

    from rest_framework.authtoken.models import Token

    from access.services import role_grant
    from studies import services

    def client_for(person) -> APIClient:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=person).key}")
        return client

    def metadata(client: APIClient, url: str) -> dict:
        response = client.get(f"{url}/metadata", HTTP_ACCEPT="application/dicom+json")
        assert response.status_code == 200
        return json.loads(b"".join(response.streaming_content))[0]

    technologist = django_user_model.objects.create_user("tech-only", password="a-long-test-password")
    role_grant(user=technologist, roles=["technologist"])  # read, no download
    reader, downloader = client_for(technologist), client_for(user)
    for name, path in (("overlay", "pydicom-data/MR-SIEMENS-DICOM-WithOverlays.dcm"),
                       ("ecg", "pydicom-test_files/waveform_ecg.dcm")):  # fmt: skip
        ds = pydicom.dcmread(dicom_files / path)
        assert services.instance_ingest(source=dicom_files / path).ok
        url = f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
        if name == "overlay":
            value, locate = ds[0x60003000].value, lambda m: m["60003000"]
        else:
            value, locate = ds.WaveformSequence[0].WaveformData, lambda m: m["54000100"]["Value"][0]["54001010"]
        hidden = locate(metadata(reader, url))
        assert "InlineBinary" not in hidden and hidden["BulkDataURI"].endswith(
            f"{url}/bulk/{'60003000' if name == 'overlay' else '54001010'}"
        )
        shown = locate(metadata(downloader, url))
        assert base64.b64decode(shown["InlineBinary"]) == value
        if name == "overlay":  # a top-level value: its URI answers, with download only
            assert reader.get(f"{url}/bulk/60003000").status_code == 403
            response = downloader.get(f"{url}/bulk/60003000")
            assert response.status_code == 200 and response["Content-Type"].startswith("multipart/related")
            assert value in b"".join(response.streaming_content)
