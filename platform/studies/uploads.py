"""Multipart uploads written once: each file goes straight into the DICOM store's spool.

Django's own upload handlers keep a file in memory, or, when the request is over
FILE_UPLOAD_MAX_MEMORY_SIZE (2.5 MB; 8 CT slices are 4.2 MB), write it to a temp file
that the ingest then reads and copies into its spool. `SpoolUploadHandler` writes each
file's chunks into the spool as the body is parsed, hashing them on the way, so a file
is written to disk once and read once (to validate it).

The upload API (studies.apis.InstanceUploadApi.dispatch) sets it up before DRF
authenticates, since a browser session's CSRF check reads the form:

    handler = spool_uploads(request)         # before anything reads the body
    try:
        ...                                  # the view: ingest_source(f) for each file
    finally:
        if handler is not None:
            handler.discard()                # what the ingest did not take
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from django.core.files.uploadhandler import FileUploadHandler
from django.http import HttpRequest

from .errors import IngestError
from .services import dicom_store
from .storage import DicomStore, Spooled, SpoolWriter


class SpooledUpload(UploadedFile):
    """An uploaded file that is already a spool in the store (or the reason it is not:
    over the upload limit). It has no file object: the ingest takes `received`."""

    def __init__(self, *, received: Spooled | IngestError, name: str, content_type: str, size: int, charset: Any):
        super().__init__(file=None, name=name, content_type=content_type, size=size, charset=charset)
        self.received = received

    def open(self, mode: str | None = None) -> SpooledUpload:
        raise ValueError("a spooled upload is not read as a file: pass `received` to the ingest")

    def close(self) -> None:  # Django closes a request's files at its end: nothing is open
        pass


class SpoolUploadHandler(FileUploadHandler):
    """Writes each file of a multipart body into the store's spool as it is parsed."""

    def __init__(self, request: HttpRequest | None = None, *, store: DicomStore, max_bytes: int) -> None:
        super().__init__(request)
        self.store, self.max_bytes = store, max_bytes
        self.spools: list[Spooled] = []
        self._writer: SpoolWriter | None = None
        self._error: IngestError | None = None

    def new_file(self, *args: Any, **kwargs: Any) -> None:
        super().new_file(*args, **kwargs)
        self._writer, self._error = self.store.spool_writer(max_bytes=self.max_bytes), None

    def receive_data_chunk(self, raw_data: bytes, start: int) -> None:
        if self._error is None and self._writer is not None:
            try:
                self._writer.write(raw_data)
            except IngestError as exc:  # over the limit: this file is rejected, the others go on
                self._error = exc
        return None

    def file_complete(self, file_size: int) -> SpooledUpload | None:
        if self._writer is None:
            return None
        received: Spooled | IngestError
        if self._error is not None:
            received = self._error
        else:
            received = self._writer.finish()
            self.spools.append(received)
        self._writer = None
        return SpooledUpload(
            received=received,
            name=self.file_name or "",
            content_type=self.content_type or "",
            size=file_size,
            charset=self.charset,
        )

    def upload_interrupted(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def discard(self) -> None:
        """Remove every spool this handler wrote that the ingest did not store (a stored
        one was renamed into the store: there is nothing left to remove)."""
        self.upload_interrupted()
        for spooled in self.spools:
            spooled.discard()


def spool_uploads(request: HttpRequest) -> SpoolUploadHandler | None:
    """Make `request`'s multipart files spool straight into the store. None when the body
    was read already (by a middleware, before the view): its files then come as Django
    made them, and the ingest copies them."""
    django_request = getattr(request, "_request", request)  # DRF's Request wraps Django's
    handler = SpoolUploadHandler(django_request, store=dicom_store(), max_bytes=settings.PRECEDENT_MAX_UPLOAD_BYTES)
    try:
        django_request.upload_handlers = [handler]
    except AttributeError:  # "You cannot set the upload handlers after the upload has been processed."
        return None
    return handler


def ingest_source(upload: UploadedFile) -> Any:
    """What the ingest takes for an uploaded file: its spool (or why there is none), or
    the file itself when Django's own handlers received it."""
    return upload.received if isinstance(upload, SpooledUpload) else upload
