"""The listener without Django: AE titles, negotiation facts, a store function that fails."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless
from pynetdicom import AE, sop_class

from dimse.listener import STORAGE_SOP_CLASSES, Listener, Status, StoreReply, decodable_transfer_syntaxes


@pytest.mark.parametrize("title", ["PRECEDENT", "A", "SIXTEEN_CHARS_AE", "  PADDED  ", "with space"])
def test_valid_ae_titles(title: str):
    Listener(ae_title=title, store=lambda stream, name: StoreReply(Status.SUCCESS, "stored"))


@pytest.mark.parametrize(
    ("title", "message"),
    [
        ("", "must not be empty"),
        ("    ", "must not be empty"),
        ("SEVENTEEN_CHARS_X", "longer than 16"),
        ("BACK\\SLASH", "other than backslash"),
        ("TAB\tTITLE", "printable ASCII"),
        ("ÉCOLE", "printable ASCII"),
    ],
)
def test_invalid_ae_titles_say_why(title: str, message: str):
    with pytest.raises(ValueError, match=message):
        Listener(ae_title=title, store=lambda stream, name: StoreReply(Status.SUCCESS, "stored"))
    with pytest.raises(ValueError, match=message):
        Listener(
            ae_title="PRECEDENT",
            store=lambda stream, name: StoreReply(Status.SUCCESS, "stored"),
            allowed_calling_ae_titles=("MODALITY", title),
        )


def test_negotiates_what_ingest_can_decode():
    syntaxes = decodable_transfer_syntaxes()
    for syntax in (ImplicitVRLittleEndian, ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless):
        assert syntax in syntaxes
    assert "1.2.840.10008.1.2.4.100" not in syntaxes  # MPEG-2: no decoder, so never promised
    assert len(set(STORAGE_SOP_CLASSES)) == len(STORAGE_SOP_CLASSES) == 19


def test_a_store_function_that_raises_is_a_processing_failure_not_a_dead_listener(caplog):
    """A bug in storing answers 0110 with a generic comment and is logged with its
    traceback; the association and the listener carry on."""

    def broken(stream, name):
        raise RuntimeError("bug with a /secret/detail")

    listener = Listener(ae_title="PRECEDENT", store=broken)
    listener.start("127.0.0.1", 0)
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(sop_class.SecondaryCaptureImageStorage)
        ae.add_requested_context(sop_class.Verification)
        assoc = ae.associate(*listener.address, ae_title="PRECEDENT")
        ds = Dataset()
        ds.SOPClassUID = sop_class.SecondaryCaptureImageStorage
        ds.SOPInstanceUID = "1.2.3.4"
        ds.PatientName = "Test"
        ds.set_original_encoding(True, True)
        ds.file_meta = Dataset()
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        status = assoc.send_c_store(ds)
        assert assoc.send_c_echo().Status == Status.SUCCESS
        assoc.release()
    finally:
        listener.stop(timeout=5)
    assert status.Status == Status.PROCESSING_FAILURE
    assert status.ErrorComment == "internal error while storing"
    assert "bug with a /secret/detail" in caplog.text
