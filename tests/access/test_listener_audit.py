"""The C-STORE listener writes associations, echoes and stores to the audit log."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pynetdicom import sop_class

from access.models import AuditEvent
from dimse.listener import Status
from tests.dimse.conftest import AE_TITLE, SENDER, associate, wait_for

CT = "pydicom-test_files/CT_small.dcm"


def dimse_events() -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(via="dimse").order_by("id"))


def test_echo_and_store_are_audited_with_the_sender(listener, dicom_files: Path):
    path = dicom_files / CT
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    with associate(listener, [(sop_class.Verification, None), (meta.MediaStorageSOPClassUID, None)]) as assoc:
        assert assoc.send_c_echo().Status == Status.SUCCESS
        assert assoc.send_c_store(path).Status == Status.SUCCESS
    wait_for(lambda: len(dimse_events()) >= 3)
    associated, echo, store = dimse_events()[:3]
    assert (associated.action, associated.outcome, associated.username) == ("associate", "ok", f"AE {SENDER}")
    assert associated.details["calling_ae"] == SENDER and associated.details["called_ae"] == AE_TITLE
    assert associated.remote_addr.startswith("127.0.0.1:")
    assert (echo.action, echo.outcome) == ("echo", "ok")
    assert (store.action, store.outcome, store.target_type, store.target) == (
        "ingest",
        "ok",
        "instance",
        meta.MediaStorageSOPInstanceUID,
    )
    assert store.details["result"] == "stored" and store.details["status"] == "0x0000"


def test_a_rejected_association_is_audited_as_denied(start_listener):
    guarded = start_listener(allowed_calling_ae_titles=["TRUSTED"])
    with associate(guarded, [(sop_class.Verification, None)], calling="STRANGER") as assoc:
        assert assoc.is_rejected
    wait_for(lambda: AuditEvent.objects.filter(via="dimse", outcome="denied").exists())
    event = AuditEvent.objects.get(via="dimse", outcome="denied")
    assert (event.action, event.username, event.details["calling_ae"]) == ("associate", "AE STRANGER", "STRANGER")
    assert event.details["reason"] == "Calling AE title not recognised"
    assert event.remote_addr.startswith("127.0.0.1:")
