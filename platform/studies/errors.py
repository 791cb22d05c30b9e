"""Why a file was not stored: one exception per kind of problem, one line each.

Every ingest path (browser upload, REST, the ingest command, the dataset importers)
reports `str(error)` to its user, and the REST API answers `http_status`.
"""

from __future__ import annotations


class IngestError(Exception):
    """A file that cannot be stored. The message is one line, meant for the sender."""

    http_status = 400

    def __init__(self, reason: str) -> None:
        # One line, bounded: the reason is shown in tables and JSON.
        reason = " ".join(str(reason).split())
        super().__init__(reason[:500])

    @property
    def reason(self) -> str:
        return str(self)


class NotDicom(IngestError):
    """Bytes that are not a DICOM Part 10 file at all."""


class InvalidDicom(IngestError):
    """A DICOM file that breaks the standard in a way we cannot store safely."""


class UnsupportedTransferSyntax(IngestError):
    """Pixel data in an encoding no installed decoder reads."""

    http_status = 415


class PixelDataError(IngestError):
    """Pixel data that is missing bytes or cannot be decoded."""


class InstanceConflict(IngestError):
    """Other bytes already stored under the same SOPInstanceUID."""

    http_status = 409


class TooLarge(IngestError):
    """Bigger than PRECEDENT_MAX_UPLOAD_BYTES."""

    http_status = 413


class RenderError(Exception):
    """Pixel data of a stored instance that cannot be turned into an image."""

    def __init__(self, reason: str) -> None:
        super().__init__(" ".join(str(reason).split())[:500])
