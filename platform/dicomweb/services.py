"""Services for DICOMweb: STOW-RS through the one ingest service, rendered images.

Every part of a STOW-RS body goes through `studies.services.instances_ingest`, so
instances stored over DICOMweb are validated, deduplicated and rejected exactly like
those uploaded in the browser, over REST, by the ingest command or by C-STORE.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from studies.dicom import Window
from studies.models import Instance
from studies.services import IngestResult, RenderRequest, instance_render_png, instances_ingest

from .dicomweb import (
    DICOM,
    FAILURE_CANNOT_UNDERSTAND,
    FAILURE_DUPLICATE_INSTANCE,
    FAILURE_NOT_MATCHING_SOP_CLASS,
    FAILURE_OUT_OF_RESOURCES,
    FAILURE_PROCESSING,
    FAILURE_STUDY_MISMATCH,
    FAILURE_TRANSFER_SYNTAX,
    ChainedReader,
    FailedInstance,
    HeaderUids,
    MalformedMultipart,
    MultipartReader,
    StoredInstance,
    failure_warning,
    header_uids,
    read_head,
    store_response,
    store_status,
)
from .selectors import Urls

# The start of each part is read before the store sees it, to name the instance in a
# failure and to check its study: 1 MiB holds the header of all but odd files.
HEAD_BYTES = 1024 * 1024


class BodyTooLarge(Exception):
    """A request body (sent without Content-Length) that grew past the upload limit."""


@dataclass
class StowOutcome:
    """What a STOW-RS request stored and what it did not, as PS3.18 10.5.3 answers it."""

    stored: list[StoredInstance] = field(default_factory=list)
    failed: list[FailedInstance] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    study_urls: set[str] = field(default_factory=set)

    @property
    def status(self) -> int:
        return store_status(len(self.stored), len(self.failed))

    def body(self, target_study_url: str = "") -> dict[str, Any]:
        # The study's RetrieveURL when everything stored belongs to one study.
        study_url = target_study_url or (next(iter(self.study_urls)) if len(self.study_urls) == 1 else "")
        return store_response(self.stored, self.failed, study_url=study_url)


def stow(
    *,
    stream: BinaryIO,
    boundary: str,
    urls: Urls,
    study_instance_uid: str = "",
    max_bytes: int | None = None,
) -> StowOutcome:
    """Store each application/dicom part of a multipart/related body.

    Parts are streamed from `stream` into the store one at a time. With
    `study_instance_uid` (POST /studies/{study}), parts of another study are not
    stored and fail with 0xC409. Duplicates (the same bytes again) count as stored.

    Raises dicomweb.MalformedMultipart at the first defect of the body, and
    BodyTooLarge once more than `max_bytes` were read; instances stored before
    either stay stored (sending them again is harmless: they come back as duplicates).
    """
    outcome = StowOutcome()
    reader = MultipartReader(stream, boundary)
    try:
        _store_parts(outcome, reader, urls, study_instance_uid, max_bytes)
    except MalformedMultipart as exc:
        if outcome.stored:
            raise MalformedMultipart(f"{exc} (the {len(outcome.stored)} instance(s) before it were stored)") from None
        raise
    if not outcome.stored and not outcome.failed:
        raise MalformedMultipart("the multipart body holds no parts")
    return outcome


def _store_parts(
    outcome: StowOutcome, reader: MultipartReader, urls: Urls, study_instance_uid: str, max_bytes: int | None
) -> None:
    """Read the parts one after the other and store the application/dicom ones in
    batches (`instances_ingest`: one transaction per batch, not per part).

    A defect of the body ends the reading; the parts before it are stored, and then
    the defect is raised. Failures are reported in part order.
    """
    sent: list[tuple[int, HeaderUids, _PartBody]] = []
    failures: list[tuple[int, HeaderUids, int, str]] = []
    stop: list[Exception] = []

    def dicom_parts() -> Iterator[tuple[BinaryIO, str]]:
        try:
            for part in reader.parts():
                if max_bytes is not None and reader.bytes_read > max_bytes:
                    raise BodyTooLarge(f"the request body is larger than the upload limit of {max_bytes} bytes")
                part_type = part.content_type.media_type or DICOM
                if part_type != DICOM:
                    reason = f"part Content-Type is {part_type}, not {DICOM}"
                    failures.append((part.number, HeaderUids(), FAILURE_CANNOT_UNDERSTAND, reason))
                    continue
                head = read_head(part, HEAD_BYTES)
                uids = header_uids(head)
                if study_instance_uid and uids.study_instance_uid != study_instance_uid:
                    found = uids.study_instance_uid or "not found in the header"
                    code = FAILURE_STUDY_MISMATCH if uids.is_part10 else FAILURE_CANNOT_UNDERSTAND
                    reason = f"StudyInstanceUID {found} is not the study {study_instance_uid} of the request URL"
                    failures.append((part.number, uids, code, reason))
                    continue
                body = _PartBody(ChainedReader(head, part), stop)
                sent.append((part.number, uids, body))
                yield body, part.location or f"part {part.number}"
                if stop:  # the body broke while this part was read
                    return
            if max_bytes is not None and reader.bytes_read > max_bytes:
                raise BodyTooLarge(f"the request body is larger than the upload limit of {max_bytes} bytes")
        except (MalformedMultipart, BodyTooLarge) as exc:
            stop.append(exc)

    results = instances_ingest(dicom_parts())
    for (number, uids, body), result in zip(sent, results, strict=True):
        if body.broken:
            continue  # not a failure of this instance: the request fails with the defect
        if result.ok:
            _stored(outcome, urls, result)
        else:
            failures.append((number, uids, _failure_reason(result, uids), result.reason))
    for number, uids, code, text in sorted(failures, key=lambda failure: failure[0]):
        _fail(outcome, urls, number, uids, code, text)
    if stop:
        raise stop[0]


class _PartBody:
    """A part's bytes on their way to the store. A defect of the multipart body met
    while reading them is kept in `stop` and ends this part as unreadable (an OSError,
    which the store turns into this file's rejection), so that the parts before it are
    still stored before the request fails with the defect."""

    def __init__(self, stream: BinaryIO, stop: list[Exception]) -> None:
        self.stream, self.stop = stream, stop
        self.broken = False

    def read(self, size: int = -1) -> bytes:
        try:
            return self.stream.read(size)
        except (MalformedMultipart, BodyTooLarge) as exc:
            self.broken = True
            self.stop.append(exc)
            raise OSError(str(exc)) from None


def _stored(outcome: StowOutcome, urls: Urls, result: IngestResult) -> None:
    instance = result.instance
    assert instance is not None
    outcome.stored.append(
        StoredInstance(
            sop_class_uid=instance.sop_class_uid,
            sop_instance_uid=result.sop_instance_uid,
            retrieve_url=urls.instance(result.study_instance_uid, result.series_instance_uid, result.sop_instance_uid),
        )
    )
    outcome.study_urls.add(urls.study(result.study_instance_uid))


def _fail(outcome: StowOutcome, urls: Urls, number: int, uids: HeaderUids, reason: int, text: str) -> None:
    failed = FailedInstance(uids.sop_class_uid, uids.sop_instance_uid, reason, text)
    outcome.failed.append(failed)
    outcome.warnings.append(failure_warning(urls.base, failed, number))


def _failure_reason(result: IngestResult, uids: HeaderUids) -> int:
    """Failure Reason (PS3.18 Table I.2-2) for an ingest rejection, by its HTTP status.

    400 covers both "not DICOM at all" (cannot understand) and "DICOM that breaks its
    SOP class" (missing UIDs, short pixel data); the Part 10 preamble tells them apart.
    """
    if result.http_status == 413:
        return FAILURE_OUT_OF_RESOURCES
    if result.http_status == 415:
        return FAILURE_TRANSFER_SYNTAX
    if result.http_status == 409:
        return FAILURE_DUPLICATE_INSTANCE
    if result.http_status == 400:
        return FAILURE_NOT_MATCHING_SOP_CLASS if uids.is_part10 else FAILURE_CANNOT_UNDERSTAND
    return FAILURE_PROCESSING


# --- rendered --------------------------------------------------------------------------


def rendered_image(
    *,
    instance: Instance,
    frame: int,
    media_type: str,
    window: Window | None = None,
    max_size: int | None = None,
    quality: int = 90,
) -> bytes | Path:
    """One frame as image/png (the cached rendering itself) or image/jpeg.

    Rendering goes through `instance_render_png` (VOI from the file, MONOCHROME1
    inverted, cached under PRECEDENT_HOME), so WADO-RS shows what the viewer shows.
    Raises RenderError when the pixels cannot be decoded.
    """
    png = instance_render_png(instance=instance, request=RenderRequest(frame=frame, window=window, max_size=max_size))
    if media_type == "image/png":
        return png
    from PIL import Image

    with Image.open(png) as image:
        rgb = image.convert("RGB") if image.mode not in ("L", "RGB") else image
        buffer = io.BytesIO()
        rgb.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
