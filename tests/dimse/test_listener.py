"""The C-STORE listener end to end: pynetdicom sends real files, ingest stores them."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from django.db import connection
from pynetdicom import _config, sop_class
from pynetdicom.dsutils import split_dataset

from dimse import services as dimse_services
from dimse.listener import MAX_PDU_SIZE, Activity, Listener, Status
from studies import dicom
from studies.models import Instance
from studies.services import dicom_store

from .conftest import AE_TITLE, SENDER, associate, wait_for

# (file under dicom-test-files, what it stands for): every modality family and
# encoding family the listener negotiates, sent byte for byte as stored on disk.
SENT_AS_STORED = [
    ("pydicom-test_files/CT_small.dcm", "CT, explicit VR little endian"),
    ("pydicom-test_files/MR_small_implicit.dcm", "MR, implicit VR little endian"),
    ("pydicom-test_files/MR_small_bigendian.dcm", "MR, explicit VR big endian"),
    ("pydicom-test_files/MR_small_jp2klossless.dcm", "MR, JPEG 2000 lossless"),
    ("pydicom-test_files/MR_small_jpeg_ls_lossless.dcm", "MR, JPEG-LS lossless"),
    ("pydicom-data/emri_small_RLE.dcm", "Enhanced MR, 10 frames, RLE"),
    ("pydicom-data/eCT_Supplemental.dcm", "Enhanced CT, 2 frames"),
    ("pydicom-data/RG1_J2KI.dcm", "CR, JPEG 2000 lossy, 1955x1841"),
    ("pydicom-data/OBXXXX1A_rle_2frame.dcm", "US multi-frame, RLE, palette colour"),
    ("pydicom-data/US1_J2KR.dcm", "US, JPEG 2000 lossless, colour"),
    ("pydicom-test_files/SC_rgb_jpeg_dcmtk.dcm", "Secondary Capture, JPEG baseline"),
    ("pydicom-test_files/image_dfl.dcm", "Secondary Capture, deflated explicit VR"),
]


def body(path: Path) -> bytes:
    """The dataset of a Part 10 file, without preamble and File Meta."""
    _meta, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def stored_path(instance: Instance) -> Path:
    return dicom_store().path(instance.file_path)


def test_echo(listener: Listener):
    with associate(listener, [(sop_class.Verification, None)]) as assoc:
        assert assoc.is_established
        assert assoc.acceptor.maximum_length == MAX_PDU_SIZE
        assert assoc.send_c_echo().Status == Status.SUCCESS


@pytest.mark.parametrize("name", [name for name, _ in SENT_AS_STORED], ids=[what for _, what in SENT_AS_STORED])
def test_store_keeps_the_dataset_bytes_as_sent(listener: Listener, dicom_files: Path, monkeypatch, name: str):
    """The sender's encoded dataset lands in the store unchanged: no decode and re-encode.

    pynetdicom's chunked sending puts the file's dataset on the wire as it is on disk,
    so the stored file must hold exactly those bytes after its own File Meta.
    """
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    path = dicom_files / name
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    with associate(listener, [(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])]) as assoc:
        assert assoc.is_established and assoc.accepted_contexts, f"{meta.TransferSyntaxUID.name} not accepted"
        status = assoc.send_c_store(path)
    assert status.Status == Status.SUCCESS, status

    instance = Instance.objects.get(sop_instance_uid=meta.MediaStorageSOPInstanceUID)
    assert instance.transfer_syntax_uid == meta.TransferSyntaxUID
    assert instance.sop_class_uid == meta.MediaStorageSOPClassUID
    assert body(stored_path(instance)) == body(path)


def test_store_reencoded_by_the_sender_keeps_pixels_and_uids(listener: Listener, dicom_files: Path):
    """pynetdicom's default sending decodes and re-encodes the file: what arrives is
    still the same instance with the same pixels."""
    paths = [dicom_files / "pydicom-test_files" / name for name in ("CT_small.dcm", "MR_small.dcm")]
    with associate(listener, [(sop_class.CTImageStorage, None), (sop_class.MRImageStorage, None)]) as assoc:
        statuses = [assoc.send_c_store(path).Status for path in paths]
    assert statuses == [Status.SUCCESS, Status.SUCCESS]
    for path in paths:
        original, original_header = dicom.read_header(path)
        instance = Instance.objects.get(sop_instance_uid=original_header.sop_instance_uid)
        stored, stored_header = dicom.read_header(stored_path(instance))
        assert stored_header.study_instance_uid == original_header.study_instance_uid
        assert stored_header.series_instance_uid == original_header.series_instance_uid
        assert stored_header.patient_id == original_header.patient_id
        assert np.array_equal(stored.pixel_array, original.pixel_array)


def test_same_instance_twice_is_success_and_one_row(listener: Listener, dicom_files: Path):
    path = dicom_files / "pydicom-test_files" / "CT_small.dcm"
    with associate(listener, [(sop_class.CTImageStorage, None)]) as assoc:
        first = assoc.send_c_store(path)
        again = assoc.send_c_store(path)
    with associate(listener, [(sop_class.CTImageStorage, None)]) as assoc:
        next_association = assoc.send_c_store(path)
    assert [first.Status, again.Status, next_association.Status] == [Status.SUCCESS] * 3
    assert "ErrorComment" not in again
    assert Instance.objects.count() == 1


def test_instance_uploaded_first_then_sent_by_c_store_is_a_duplicate(
    listener: Listener, dicom_files: Path, monkeypatch
):
    """Another route gives the same dataset another File Meta: still the same instance."""
    from studies import services

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # the dataset as it is on disk
    path = dicom_files / "pydicom-test_files" / "MR_small_RLE.dcm"
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    assert services.instance_ingest(source=path).outcome == "stored"
    with associate(listener, [(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])]) as assoc:
        response = assoc.send_c_store(path)
    assert response.Status == Status.SUCCESS and "ErrorComment" not in response
    assert Instance.objects.count() == 1


def test_other_content_under_a_stored_uid_fails_with_a_reason(listener: Listener, make_dicom):
    first = pydicom.dcmread(io.BytesIO(make_dicom(PatientName="First^Sender")))
    other = pydicom.dcmread(io.BytesIO(make_dicom(SOPInstanceUID=first.SOPInstanceUID, PatientName="Other^Sender")))
    with associate(listener, [(sop_class.CTImageStorage, None)]) as assoc:
        stored = assoc.send_c_store(first)
        conflict = assoc.send_c_store(other)
    assert stored.Status == Status.SUCCESS
    assert conflict.Status == Status.CONFLICT
    assert conflict.ErrorComment == "already stored with different content"
    assert len(conflict.ErrorComment) <= 64
    instance = Instance.objects.select_related("series__study__patient").get()
    assert instance.series.study.patient.name == "First^Sender"


@pytest.mark.parametrize(
    ("transform", "reason"),
    [
        (lambda ds: delattr(ds, "StudyInstanceUID"), "missing StudyInstanceUID (0020,000D)"),
        (lambda ds: setattr(ds, "PixelData", ds.PixelData[:1000]), "Pixel Data is 1000 bytes, but"),
        (lambda ds: setattr(ds, "SeriesInstanceUID", "1.2.x.4"), "SeriesInstanceUID (0020,000E) is not a valid"),
    ],
    ids=["no StudyInstanceUID", "short pixel data", "malformed UID"],
)
def test_data_ingest_rejects_fails_with_the_reason_and_stores_nothing(
    listener: Listener, make_dicom, precedent_home: Path, transform, reason: str
):
    dataset = pydicom.dcmread(io.BytesIO(make_dicom(transform=transform)))
    with associate(listener, [(sop_class.CTImageStorage, None), (sop_class.Verification, None)]) as assoc:
        status = assoc.send_c_store(dataset)
        still_open = assoc.send_c_echo()
    assert status.Status == Status.CANNOT_UNDERSTAND
    assert status.ErrorComment.startswith(reason)
    assert status.ErrorComment.isascii() and len(status.ErrorComment) <= 64
    assert still_open.Status == Status.SUCCESS  # one bad instance does not end the association
    assert not Instance.objects.exists()
    assert not list((precedent_home / "dicom").rglob("*.dcm"))
    assert list((precedent_home / "tmp").iterdir()) == []


def test_larger_than_the_upload_limit_is_refused_out_of_resources(listener: Listener, dicom_files: Path, settings):
    settings.PRECEDENT_MAX_UPLOAD_BYTES = 10_000
    with associate(listener, [(sop_class.CTImageStorage, None)]) as assoc:
        status = assoc.send_c_store(dicom_files / "pydicom-test_files" / "CT_small.dcm")
    assert status.Status == Status.OUT_OF_RESOURCES
    assert "upload limit" in status.ErrorComment
    assert not Instance.objects.exists()


def test_storage_failure_is_a_retryable_refusal_and_the_listener_carries_on(
    listener: Listener, dicom_files: Path, monkeypatch
):
    """A full disk or a lost database is no fault of the data: A7xx, so the sender
    retries later, and no internal detail goes to the peer."""
    real_ingest = dimse_services.instance_ingest

    def disk_full(**kwargs):
        raise OSError(28, "No space left on device", "/secret/path")

    path = dicom_files / "pydicom-test_files" / "CT_small.dcm"
    with associate(listener, [(sop_class.CTImageStorage, None)]) as assoc:
        monkeypatch.setattr(dimse_services, "instance_ingest", disk_full)
        refused = assoc.send_c_store(path)
        monkeypatch.setattr(dimse_services, "instance_ingest", real_ingest)
        retried = assoc.send_c_store(path)
    assert refused.Status == Status.STORAGE_UNAVAILABLE
    assert refused.ErrorComment == "storage unavailable, try again later"
    assert retried.Status == Status.SUCCESS
    assert Instance.objects.count() == 1


def test_unknown_calling_ae_title_is_rejected_when_titles_are_configured(start_listener, caplog):
    caplog.set_level(logging.INFO, logger="dimse.listener")
    listener = start_listener(allowed_calling_ae_titles=[SENDER, "WORKSTATION"])
    with associate(listener, [(sop_class.Verification, None)], calling="STRANGER") as stranger:
        assert (stranger.is_rejected, stranger.is_established) == (True, False)
    with associate(listener, [(sop_class.Verification, None)], calling=SENDER) as known:
        assert known.is_established
        assert known.send_c_echo().Status == Status.SUCCESS

    def rejection() -> Activity | None:
        activities = [getattr(r, "dicom_activity", None) for r in caplog.records]
        return next((a for a in activities if a is not None and a.kind == "rejected"), None)

    wait_for(rejection)
    activity = rejection()
    assert activity.calling_ae == "STRANGER"
    assert activity.peer.startswith("127.0.0.1:")
    assert activity.reason == "Calling AE title not recognised"


def test_any_calling_ae_title_is_accepted_when_none_are_configured(listener: Listener):
    with associate(listener, [(sop_class.Verification, None)], calling="ANYONE") as assoc:
        assert assoc.is_established


def test_association_calling_another_ae_title_is_rejected(listener: Listener):
    with associate(listener, [(sop_class.Verification, None)], called="ELSEWHERE") as assoc:
        assert assoc.is_rejected


def test_storage_class_not_accepted_is_a_rejected_context(listener: Listener, dicom_files: Path):
    contexts = [(sop_class.RTPlanStorage, None), (sop_class.CTImageStorage, None)]
    with associate(listener, contexts) as assoc:
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [sop_class.CTImageStorage]
        assert [cx.abstract_syntax for cx in assoc.rejected_contexts] == [sop_class.RTPlanStorage]
        with pytest.raises(ValueError, match="No presentation context"):
            assoc.send_c_store(dicom_files / "pydicom-test_files" / "rtplan.dcm")
    assert not Instance.objects.exists()


def test_each_store_is_logged_with_sender_peer_instance_and_outcome(listener: Listener, dicom_files: Path, caplog):
    caplog.set_level(logging.INFO, logger="dimse.listener")
    path = dicom_files / "pydicom-test_files" / "MR_small.dcm"
    with associate(listener, [(sop_class.MRImageStorage, None)]) as assoc:
        assoc.send_c_store(path)
        assoc.send_c_store(path)

    def activities() -> list[Activity]:
        return [r.dicom_activity for r in caplog.records if hasattr(r, "dicom_activity")]

    wait_for(lambda: any(a.kind == "released" for a in activities()))
    stores = [a for a in activities() if a.kind == "store"]
    uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    assert [(a.outcome, a.status) for a in stores] == [("stored", 0), ("duplicate", 0)]
    assert all(a.sop_instance_uid == uid and a.calling_ae == SENDER and a.called_ae == AE_TITLE for a in stores)
    assert all(a.sop_class_uid == sop_class.MRImageStorage for a in stores)
    assert [a.kind for a in activities()] == ["accepted", "store", "store", "released"]
    assert f"store {SENDER}@127.0.0.1:" in caplog.text and f"{uid}: stored (0x0000)" in caplog.text


def _database_connections() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return cursor.fetchone()[0]


def test_association_thread_closes_its_database_connection(listener: Listener, dicom_files: Path):
    """Each association stores over its own connection (its own thread); one left
    open per association would exhaust PostgreSQL's connections within a day."""
    before = _database_connections()
    path = dicom_files / "pydicom-test_files" / "CT_small.dcm"
    for _ in range(3):
        with associate(listener, [(sop_class.CTImageStorage, None)]) as assoc:
            assert assoc.send_c_store(path).Status == Status.SUCCESS
    wait_for(lambda: _database_connections() == before)
