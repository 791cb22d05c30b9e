"""A DICOM C-STORE SCP (pynetdicom) that hands every received instance to a store function.

No Django here: the caller passes `store`, which takes the instance as a Part 10 byte
stream and answers a `StoreReply`, and optionally `on_association_end`, which runs in
the association's thread once it is released or aborted (the Django side closes that
thread's database connection there), and `on_activity`, which gets every `Activity`
(the Django side writes it to the audit log). `dimse.services.build_listener` wires both to the
ingest service; the `dicom_listener` command and the tests both use it.

What is accepted: Verification (C-ECHO), and storage of the image SOP classes in
`STORAGE_SOP_CLASSES` in every transfer syntax an installed pydicom pixel decoder reads
(`decodable_transfer_syntaxes`), so a sender never gets an instance through that ingest
would then reject for its encoding; a sender with other encodings falls back to one of
these, as the standard's negotiation intends. Anything else is a rejected presentation
context, which the sender sees before it sends a byte of pixel data.

Every association, echo and store is logged on this module's logger with the calling AE
title, the peer address and the outcome; each record carries the same facts as
`record.dicom_activity` (an `Activity`) so the audit log can be wired in with a logging
handler, without parsing text.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pynetdicom import AE, evt, sop_class
from pynetdicom.association import Association
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger(__name__)

# Image storage for the modalities the platform reads: MG (2D, and the tomosynthesis and
# projection objects screening units send beside them), DX, CR, CT, MR, US and Secondary
# Capture (the form scanned films and exported key images take).
STORAGE_SOP_CLASSES: tuple[str, ...] = (
    sop_class.DigitalMammographyXRayImageStorageForPresentation,
    sop_class.DigitalMammographyXRayImageStorageForProcessing,
    sop_class.BreastTomosynthesisImageStorage,
    sop_class.BreastProjectionXRayImageStorageForPresentation,
    sop_class.BreastProjectionXRayImageStorageForProcessing,
    sop_class.DigitalXRayImageStorageForPresentation,
    sop_class.DigitalXRayImageStorageForProcessing,
    sop_class.ComputedRadiographyImageStorage,
    sop_class.CTImageStorage,
    sop_class.EnhancedCTImageStorage,
    sop_class.MRImageStorage,
    sop_class.EnhancedMRImageStorage,
    sop_class.UltrasoundImageStorage,
    sop_class.UltrasoundMultiFrameImageStorage,
    sop_class.SecondaryCaptureImageStorage,
    sop_class.MultiFrameSingleBitSecondaryCaptureImageStorage,
    sop_class.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    sop_class.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    sop_class.MultiFrameTrueColorSecondaryCaptureImageStorage,
)

AE_TITLE_MAX_LENGTH = 16
# The largest P-DATA PDU senders may send us. pynetdicom's default (16 KiB) made a 7 MB
# CR cost ~60 ms of DIMSE handling here; 256 KiB halves that, and larger gains nothing.
MAX_PDU_SIZE = 256 * 1024
# ErrorComment (0000,0902) is LO: at most 64 characters of the default repertoire.
ERROR_COMMENT_MAX_LENGTH = 64


class Status(enum.IntEnum):
    """The C-STORE statuses this SCP answers (PS3.4 B.2.3, PS3.7 Annex C).

    A duplicate is a success: the instance is stored, which is all a C-STORE success
    promises, and a warning (B000 "coercion", B006 "elements discarded") would claim a
    change to the data we did not make. Failures that a later retry can cure are A7xx
    ("refused: out of resources"); failures that no retry cures are Cxxx ("cannot
    understand"), each with the reason in ErrorComment.
    """

    SUCCESS = 0x0000
    # Larger than PRECEDENT_MAX_UPLOAD_BYTES.
    OUT_OF_RESOURCES = 0xA700
    # The disk or the database failed; the same instance may well be stored later.
    STORAGE_UNAVAILABLE = 0xA701
    # Not storable as sent: invalid DICOM, missing UIDs, undecodable pixel data.
    CANNOT_UNDERSTAND = 0xC000
    # Other bytes are already stored under this SOPInstanceUID (the REST API's 409).
    CONFLICT = 0xC409
    # A fault of ours, logged with its traceback.
    PROCESSING_FAILURE = 0x0110


@dataclass(frozen=True)
class StoreReply:
    """What the store function made of one instance: the status, a word, and why.

    `reason` goes to the log in full; the peer gets `comment`, or else the reason cut to
    the 64 characters ErrorComment holds, so a long reason needs a short comment.
    """

    status: Status
    outcome: str
    reason: str = ""
    comment: str = ""


StoreFunction = Callable[[BinaryIO, str], StoreReply]


@dataclass(frozen=True)
class Activity:
    """One thing that happened on the listener, as the audit log will want it."""

    kind: str  # accepted, rejected, echo, store, released, aborted
    calling_ae: str
    called_ae: str
    peer: str
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    outcome: str = ""
    status: int | None = None
    reason: str = ""

    def __str__(self) -> str:
        text = f"{self.kind} {self.calling_ae}@{self.peer} -> {self.called_ae}"
        if self.sop_instance_uid:
            text += f" {uid.UID(self.sop_class_uid).name} {self.sop_instance_uid}"
        if self.outcome:
            text += f": {self.outcome}"
        if self.status is not None:
            text += f" (0x{self.status:04X})"
        if self.reason:
            text += f": {self.reason}"
        return text


def validate_ae_title(title: str, *, what: str = "AE title") -> str:
    """The title without its insignificant spaces, or ValueError saying what is wrong.

    PS3.5 AE: 1 to 16 characters of the default repertoire, no backslash, no control
    characters; leading and trailing spaces are not significant.
    """
    stripped = title.strip(" ")
    if not stripped:
        raise ValueError(f"{what} must not be empty")
    if len(stripped) > AE_TITLE_MAX_LENGTH:
        raise ValueError(f"{what} {stripped!r} is longer than {AE_TITLE_MAX_LENGTH} characters")
    if any(not (0x20 <= ord(ch) < 0x7F) or ch == "\\" for ch in stripped):
        raise ValueError(f"{what} {stripped!r} may only hold printable ASCII characters other than backslash")
    return stripped


def decodable_transfer_syntaxes() -> list[str]:
    """Every transfer syntax an installed pydicom decoder reads.

    With pydicom 3, pylibjpeg (libjpeg, openjpeg, rle) and python-gdcm that is implicit
    and explicit VR little endian, explicit big endian, deflate, RLE, JPEG baseline,
    extended and lossless, JPEG-LS, JPEG 2000 and HTJ2K; asked at start-up rather than
    listed so that a missing plugin narrows what is negotiated instead of making ingest
    reject what the sender was told it could send.
    """
    syntaxes = []
    for syntax in uid.AllTransferSyntaxes:
        try:
            if get_decoder(syntax).is_available:
                syntaxes.append(str(syntax))
        except NotImplementedError:
            continue
    return syntaxes


class _Part10Stream:
    """A received dataset read as a Part 10 file: preamble, File Meta, then the dataset
    exactly as the peer encoded it. Read in chunks, so the dataset (held in memory by
    pynetdicom) is not copied a second time."""

    def __init__(self, head: bytes, body: BinaryIO) -> None:
        self._head = head
        self._body = body

    def read(self, size: int | None = -1) -> bytes:
        if not self._head:
            return self._body.read(size)
        if size is None or size < 0:
            data, self._head = self._head + self._body.read(), b""
            return data
        data, self._head = self._head[:size], self._head[size:]
        return data + (self._body.read(size - len(data)) if size > len(data) else b"")


def _error_comment(reason: str) -> str:
    """The reason as an LO value: ASCII, no backslash or control characters, 64 at most."""
    text = reason.replace("×", "x").encode("ascii", "replace").decode("ascii")
    text = "".join(ch if ch.isprintable() and ch != "\\" else " " for ch in text)
    if len(text) > ERROR_COMMENT_MAX_LENGTH:
        text = text[: ERROR_COMMENT_MAX_LENGTH - 3] + "..."
    return text


class Listener:
    """One AE listening on one address; `start` returns at once, `stop` ends it."""

    def __init__(
        self,
        *,
        ae_title: str,
        store: StoreFunction,
        allowed_calling_ae_titles: tuple[str, ...] = (),
        require_called_ae_title: bool = True,
        on_association_end: Callable[[], None] | None = None,
        on_activity: Callable[[Activity], None] | None = None,
    ) -> None:
        self.store = store
        self.on_association_end = on_association_end
        self.on_activity = on_activity
        self.ae = AE(ae_title=validate_ae_title(ae_title))
        self.ae.maximum_pdu_size = MAX_PDU_SIZE
        # Empty means any calling AE; otherwise others get A-ASSOCIATE-RJ "calling AE
        # title not recognised" before any data is exchanged.
        self.ae.require_calling_aet = [
            validate_ae_title(title, what="allowed calling AE title") for title in allowed_calling_ae_titles
        ]
        # A sender that names another AE is misconfigured: its images belong elsewhere.
        self.ae.require_called_aet = require_called_ae_title
        self.ae.add_supported_context(sop_class.Verification)
        syntaxes = decodable_transfer_syntaxes()
        for storage in STORAGE_SOP_CLASSES:
            self.ae.add_supported_context(storage, syntaxes)
        self.server: ThreadedAssociationServer | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port): with port 0 the system picks a free one."""
        if self.server is None:
            raise RuntimeError("the listener is not running")
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def start(self, host: str, port: int) -> None:
        """Listen in a background thread. Raises OSError when the address cannot be bound."""
        handlers = [
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_end, ["released"]),
            (evt.EVT_ABORTED, self._on_end, ["aborted"]),
        ]
        self.server = self.ae.start_server((host, port), block=False, evt_handlers=handlers)

    def stop(self, *, timeout: float = 30.0) -> int:
        """Stop accepting, abort the associations still open, and give a store in
        progress up to `timeout` seconds to finish its transaction. Returns how many
        associations were aborted.

        Aborting rather than waiting for peers to release: a modality may hold an idle
        association open for hours, and a sender whose store was cut off sends it
        again, which ingest answers as a duplicate.
        """
        if self.server is None:
            return 0
        server, self.server = self.server, None
        server.shutdown()
        open_associations = server.active_associations
        established = [association for association in open_associations if association.is_established]
        for association in established:
            association.abort()
        for association in open_associations:
            association.join(timeout)
        return len(established)

    # --- event handlers, each run in the association's own thread ---------------------

    def _on_accepted(self, event: Event) -> None:
        contexts = len(event.assoc.accepted_contexts)
        offered = contexts + len(event.assoc.rejected_contexts)
        self._report(
            _activity(event.assoc, "accepted", reason=f"{contexts} of {offered} presentation contexts accepted")
        )

    def _on_rejected(self, event: Event) -> None:
        primitive = event.assoc.acceptor.primitive
        reason = primitive.reason_str if primitive is not None else ""
        self._report(_activity(event.assoc, "rejected", reason=reason), level=logging.WARNING)

    def _on_echo(self, event: Event) -> Status:
        self._report(_activity(event.assoc, "echo", outcome="ok", status=Status.SUCCESS))
        return Status.SUCCESS

    def _on_store(self, event: Event) -> Dataset:
        request = event.request
        sop_class_uid = str(request.AffectedSOPClassUID)
        sop_instance_uid = str(request.AffectedSOPInstanceUID)
        calling = event.assoc.requestor.ae_title
        head = b"\x00" * 128 + b"DICM" + encode_file_meta(event.file_meta)
        body = request.DataSet
        body.seek(0)
        try:
            reply = self.store(_Part10Stream(head, body), f"C-STORE from {calling}: {sop_instance_uid}")
        except Exception:
            # The store function maps every expected failure to a status itself.
            log.exception("storing %s from %s failed", sop_instance_uid, calling)
            reply = StoreReply(Status.PROCESSING_FAILURE, "failed", "internal error while storing")
        level = logging.INFO if reply.status == Status.SUCCESS else logging.WARNING
        activity = _activity(
            event.assoc,
            "store",
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            outcome=reply.outcome,
            status=reply.status,
            reason=reply.reason,
        )
        self._report(activity, level=level)
        status = Dataset()
        status.Status = int(reply.status)
        if reply.status != Status.SUCCESS and (reply.comment or reply.reason):
            status.ErrorComment = _error_comment(reply.comment or reply.reason)
        return status

    def _on_end(self, event: Event, kind: str) -> None:
        self._report(_activity(event.assoc, kind), level=logging.INFO if kind == "released" else logging.WARNING)
        # An abort from stop() runs in the stopping thread, whose connections are not ours.
        if self.on_association_end is not None and threading.current_thread() is event.assoc:
            self.on_association_end()

    def _report(self, activity: Activity, *, level: int = logging.INFO) -> None:
        log.log(level, "%s", activity, extra={"dicom_activity": activity})
        if self.on_activity is not None:
            try:
                self.on_activity(activity)
            except Exception:
                # The audit hook must not turn an answered request into a failed one.
                log.exception("recording %s failed", activity)


def _activity(association: Association, kind: str, **facts: Any) -> Activity:
    requestor = association.requestor
    called = requestor.primitive.called_ae_title if requestor.primitive is not None else ""
    return Activity(
        kind=kind,
        calling_ae=requestor.ae_title,
        called_ae=called,
        peer=f"{requestor.address}:{requestor.port}",
        **facts,
    )
