"""The C-STORE listener wired to the ingest service: the Django side of `dimse.listener`.

A received instance goes through `studies.services.instance_ingest` like an upload, so
it is validated, deduplicated and stored the same way; this module only turns the
ingest outcome into a C-STORE status and looks after the database connection of the
association's thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import BinaryIO

from django.db import DatabaseError, close_old_connections, connections
from pynetdicom.association import Association

from access.models import Outcome as AuditOutcome
from access.models import Via
from access.services import audit_record
from studies.services import Outcome, instance_ingest

from .listener import Activity, Listener, Status, StoreReply

log = logging.getLogger(__name__)

# Ingest reports a rejection with the HTTP status the REST API answers; anything not
# listed (400 invalid, 415 undecodable) is data no retry will make storable.
_REJECTION_STATUS = {409: Status.CONFLICT, 413: Status.OUT_OF_RESOURCES}
# Ingest's conflict reason opens with the 64-character UID, which would fill the whole
# ErrorComment; the response names the instance already (Affected SOP Instance UID).
_CONFLICT_COMMENT = "already stored with different content"


def store_instance(stream: BinaryIO, name: str) -> StoreReply:
    """Ingest one received instance and say which C-STORE status answers it.

    Each association runs in its own thread with its own database connection, kept for
    the association's stores; like Django around a request, a connection past
    CONN_MAX_AGE or broken by an error is replaced before and dropped after each store.
    """
    close_old_connections()
    try:
        result = instance_ingest(source=stream, name=name)
    except (DatabaseError, OSError):
        # The database or the disk, not the data: the sender may retry later. The
        # details stay in our log; the peer gets no internal host names or paths.
        log.exception("cannot store %s", name)
        return StoreReply(Status.STORAGE_UNAVAILABLE, "failed", "storage unavailable, try again later")
    finally:
        close_old_connections()
    if result.outcome == Outcome.STORED:
        return StoreReply(Status.SUCCESS, "stored")
    if result.outcome == Outcome.DUPLICATE:
        return StoreReply(Status.SUCCESS, "duplicate")
    status = _REJECTION_STATUS.get(result.http_status, Status.CANNOT_UNDERSTAND)
    comment = _CONFLICT_COMMENT if status == Status.CONFLICT else ""
    return StoreReply(status, "rejected", result.reason, comment)


def build_listener(
    *, ae_title: str, allowed_calling_ae_titles: Sequence[str] = (), require_called_ae_title: bool = True
) -> Listener:
    """The listener the `dicom_listener` command runs: stores through ingest and closes
    the association thread's database connections when the association ends.

    Raises ValueError for an invalid AE title.
    """
    return Listener(
        ae_title=ae_title,
        store=store_instance,
        allowed_calling_ae_titles=tuple(allowed_calling_ae_titles),
        require_called_ae_title=require_called_ae_title,
        on_association_end=connections.close_all,
        on_activity=audit_activity,
    )


# Listener activity → audit action; "released" (the normal end) gets no row of its own.
_AUDIT_ACTIONS = {
    "accepted": "associate",
    "rejected": "associate",
    "echo": "echo",
    "store": "ingest",
    "aborted": "abort",
}


def audit_activity(activity: Activity) -> None:
    """Write one listener activity to the audit log: associations accepted or rejected
    (with the calling AE title and the peer's address), every C-ECHO and C-STORE."""
    action = _AUDIT_ACTIONS.get(activity.kind)
    if action is None:
        return
    if activity.kind == "rejected":
        outcome = AuditOutcome.DENIED
    elif activity.kind == "aborted" or activity.outcome in ("rejected", "failed"):
        outcome = AuditOutcome.ERROR
    else:
        outcome = AuditOutcome.OK
    details = {"calling_ae": activity.calling_ae, "called_ae": activity.called_ae}
    if activity.sop_class_uid:
        details["sop_class_uid"] = activity.sop_class_uid
    if activity.outcome:
        details["result"] = activity.outcome
    if activity.status is not None:
        details["status"] = f"0x{activity.status:04X}"
    if activity.reason:
        details["reason"] = activity.reason
    try:
        audit_record(
            action=action,
            via=Via.DIMSE,
            username=f"AE {activity.calling_ae}",
            remote_addr=activity.peer,
            target_type="instance" if activity.sop_instance_uid else "ae",
            target=activity.sop_instance_uid or activity.called_ae,
            outcome=outcome,
            details=details,
        )
    except DatabaseError as error:
        # The listener keeps answering (a C-ECHO needs no database); the operator sees
        # that the audit log missed this activity, in one line.
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        log.error("audit log unavailable, not recorded: %s (%s)", activity, reason)
    finally:
        # A rejected association never ends with a release or abort, so nothing else
        # closes the connection its thread just opened for this row.
        if activity.kind == "rejected" and isinstance(threading.current_thread(), Association):
            connections.close_all()
