"""The C-STORE listener wired to the ingest service: the Django side of `dimse.listener`.

A received instance goes through `studies.services.instance_ingest` like an upload, so
it is validated, deduplicated and stored the same way; this module only turns the
ingest outcome into a C-STORE status and looks after the database connection of the
association's thread.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import BinaryIO

from django.db import DatabaseError, close_old_connections, connections

from studies.services import Outcome, instance_ingest

from .listener import Listener, Status, StoreReply

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
    )
