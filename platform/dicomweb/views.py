"""DICOMweb views (PS3.18): STOW-RS, QIDO-RS and WADO-RS under /dicomweb/.

Views are Django REST framework views (`precedent.api.ApiView`), so DICOMweb
authenticates exactly like the REST API: a DRF token (`Authorization: Token ...`) or
the browser session, 401 without either. DRF only authenticates and renders JSON
error bodies (`{"error": "<reason>"}`); the DICOMweb media types (multipart/related,
DICOM JSON, images) are negotiated here, by `dicomweb.negotiate_*`, and bodies are
streamed: STOW-RS reads parts straight into the store, WADO-RS sends stored files and
frames as they are read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, BinaryIO

from django.conf import settings
from django.http import FileResponse, HttpResponse, StreamingHttpResponse
from django.urls import reverse
from pydicom.uid import UID, ExplicitVRLittleEndian
from rest_framework import status
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response

from precedent.api import ApiView, body_over_limit, error_response
from studies.errors import RenderError
from studies.models import Instance
from studies.services import dicom_store

from . import selectors, services
from .dicomweb import (
    DICOM,
    DICOM_JSON,
    FRAME_MEDIA_TYPES,
    INLINE_BINARY_MAX,
    OCTET_STREAM,
    PIXEL_TAGS,
    FrameEncoding,
    Level,
    MalformedMultipart,
    MediaRange,
    NotAcceptable,
    OutPart,
    QidoError,
    UnsupportedMediaType,
    bulk_data,
    file_chunks,
    frames,
    instance_metadata,
    more_results_warning,
    multipart_body,
    multipart_content_type,
    negotiate_frames,
    negotiate_instances,
    negotiate_json,
    negotiate_rendered,
    new_boundary,
    parse_accept,
    parse_frame_list,
    parse_qido,
    parse_render_params,
    stow_boundary,
)
from .selectors import Urls
from .services import BodyTooLarge

# Most results one QIDO-RS answer carries; a fuller result says so in a Warning and
# the client pages on with offset (PS3.18 8.3.4.3).
MAX_RESULTS = 1000


class LengthRequired(Exception):
    """A chunked request body this server cannot read (HTTP 411)."""


class _ErrorsAsJson(BaseContentNegotiation):
    """DICOMweb picks its own media types; DRF renders only error bodies, as JSON,
    whatever Accept asks for (a 406 from DRF would hide the real answer)."""

    def select_parser(self, request, parsers):
        return None

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


class DicomwebView(ApiView):
    content_negotiation_class = _ErrorsAsJson
    renderer_classes = [JSONRenderer]
    parser_classes: list = []  # STOW-RS streams the body itself

    def handle_exception(self, exc: Exception) -> Any:
        """Each DICOMweb error as its status with a one-line reason (PS3.18 8.5)."""
        for kind, code in (
            (NotAcceptable, status.HTTP_406_NOT_ACCEPTABLE),
            (UnsupportedMediaType, status.HTTP_415_UNSUPPORTED_MEDIA_TYPE),
            (MalformedMultipart, status.HTTP_400_BAD_REQUEST),
            (QidoError, status.HTTP_400_BAD_REQUEST),
            (BodyTooLarge, status.HTTP_413_REQUEST_ENTITY_TOO_LARGE),
            (LengthRequired, status.HTTP_411_LENGTH_REQUIRED),
        ):
            if isinstance(exc, kind):
                return error_response(str(exc), code)
        return super().handle_exception(exc)

    @property
    def urls(self) -> Urls:
        root = reverse("dicomweb:studies").removesuffix("/studies")
        return Urls(self.request.build_absolute_uri(root))

    @property
    def accept(self) -> list[MediaRange]:
        """The Accept header, or the `accept` query parameter that overrides it (PS3.18 8.3.3.1)."""
        return parse_accept(self.request.query_params.get("accept") or self.request.META.get("HTTP_ACCEPT"))

    def instances_or_404(self, study: str, series: str = "", instance: str = "") -> list[Instance] | Response:
        found = selectors.instances_for(study_instance_uid=study, series_instance_uid=series, sop_instance_uid=instance)
        if found:
            return found
        named = " / ".join(uid for uid in (study, series, instance) if uid)
        return error_response(f"nothing stored under {named}", status.HTTP_404_NOT_FOUND)


def _with_warnings(response: HttpResponse, warnings: list[str]) -> HttpResponse:
    if warnings:
        response["Warning"] = ", ".join(warnings)
    return response


# --- QIDO-RS and STOW-RS -------------------------------------------------------------------


class _Search(DicomwebView):
    level: Level

    def search(self, study: str = "", series: str = "") -> HttpResponse:
        media_type = negotiate_json(self.accept)
        urls = self.urls
        params = [(key, value) for key, values in self.request.query_params.lists() for value in values]
        query = parse_qido(params, self.level, service=urls.base, max_results=MAX_RESULTS)
        result = selectors.qido_search(query=query, urls=urls, study_instance_uid=study, series_instance_uid=series)
        warnings = list(query.warnings)
        if result.more and query.capped:
            warnings.append(more_results_warning(urls.base))
        # An empty result is 200 with [] (as Orthanc answers, and as CP-2473 settles
        # the 204 of PS3.18 8.3.4.4.1, which RFC 9110 forbids to carry a body).
        return _with_warnings(HttpResponse(json.dumps(result.datasets), content_type=media_type), warnings)


class StudiesView(_Search):
    """GET /studies: Search for Studies. POST /studies: Store Instances (STOW-RS)."""

    level = Level.STUDY

    def get(self, request):
        return self.search()

    def post(self, request):
        return store(self, request)


class StudyView(DicomwebView):
    """GET /studies/{study}: Retrieve Study. POST /studies/{study}: STOW-RS into that study."""

    def get(self, request, study: str):
        return retrieve(self, study)

    def post(self, request, study: str):
        return store(self, request, study)


class SeriesSearchView(_Search):
    """GET /series and /studies/{study}/series: Search for Series."""

    level = Level.SERIES

    def get(self, request, study: str = ""):
        return self.search(study)


class InstancesSearchView(_Search):
    """GET /instances, /studies/{study}/instances, /studies/{study}/series/{series}/instances."""

    level = Level.INSTANCE

    def get(self, request, study: str = "", series: str = ""):
        return self.search(study, series)


def store(view: DicomwebView, request, study: str = "") -> HttpResponse:
    """STOW-RS (PS3.18 10.5): 200 all stored, 202 some failed, 409 none stored; the
    Store Instances Response in DICOM JSON, and one Warning per failed part."""
    negotiate_json(view.accept)
    boundary = stow_boundary(request.META.get("CONTENT_TYPE"))
    limit = settings.PRECEDENT_MAX_UPLOAD_BYTES
    too_large = body_over_limit(request)
    if too_large:
        raise BodyTooLarge(too_large)
    urls = view.urls
    outcome = services.stow(
        stream=_body(request), boundary=boundary, urls=urls, study_instance_uid=study, max_bytes=limit
    )
    body = outcome.body(urls.study(study) if study else "")
    response = HttpResponse(json.dumps(body), status=outcome.status, content_type=DICOM_JSON)
    return _with_warnings(response, outcome.warnings)


def _body(request) -> BinaryIO:
    """The request body as a stream, also when it comes chunked.

    Django reads CONTENT_LENGTH bytes and nothing without it; servers that decode
    chunked bodies (gunicorn, uWSGI) say so with `wsgi.input_terminated`, and their
    `wsgi.input` then ends where the body ends. dicomweb-client sends bodies over
    1 MB chunked.
    """
    meta = request.META
    if meta.get("CONTENT_LENGTH"):
        return request._request
    if "chunked" in meta.get("HTTP_TRANSFER_ENCODING", "").lower():
        if meta.get("wsgi.input_terminated"):
            return meta["wsgi.input"]
        raise LengthRequired(
            "this server cannot read a chunked request body: send Content-Length (or run under gunicorn)"
        )
    return request._request


# --- WADO-RS -------------------------------------------------------------------------------


def retrieve(view: DicomwebView, study: str, series: str = "", instance: str = "") -> HttpResponse:
    """The stored files as multipart/related; type="application/dicom", streamed."""
    found = view.instances_or_404(study, series, instance)
    if isinstance(found, Response):
        return found
    negotiate_instances(view.accept, {i.transfer_syntax_uid for i in found})
    urls = view.urls
    files = dicom_store()
    boundary = new_boundary()
    parts = (
        OutPart(
            f"{DICOM}; transfer-syntax={i.transfer_syntax_uid}",
            file_chunks(files.path(i.file_path)),
            location=urls.instance(study, i.series.series_instance_uid, i.sop_instance_uid),
        )
        for i in found
    )
    return StreamingHttpResponse(multipart_body(parts, boundary), content_type=multipart_content_type(DICOM, boundary))


class SeriesView(DicomwebView):
    """GET /studies/{study}/series/{series}: Retrieve Series."""

    def get(self, request, study: str, series: str):
        return retrieve(self, study, series)


class InstanceView(DicomwebView):
    """GET /studies/{study}/series/{series}/instances/{instance}: Retrieve Instance."""

    def get(self, request, study: str, series: str, instance: str):
        return retrieve(self, study, series, instance)


class MetadataView(DicomwebView):
    """GET .../metadata at study, series or instance level: the headers in DICOM JSON,
    Pixel Data as a BulkDataURI (see dicomweb.instance_metadata)."""

    def get(self, request, study: str, series: str = "", instance: str = ""):
        found = self.instances_or_404(study, series, instance)
        if isinstance(found, Response):
            return found
        media_type = negotiate_json(self.accept)
        urls = self.urls
        files = dicom_store()
        from access.enforce import request_may
        from access.policy import DOWNLOAD

        # Metadata needs read; binary values beyond a small size need download, as the
        # file and the frames do: without it they come as a BulkDataURI that refuses.
        inline_max = None if request_may(request, DOWNLOAD) else INLINE_BINARY_MAX

        def datasets() -> Iterator[bytes]:
            yield b"["
            for number, item in enumerate(found):
                url = urls.instance(study, item.series.series_instance_uid, item.sop_instance_uid)
                metadata = instance_metadata(
                    files.path(item.file_path), bulk_data_base=f"{url}/bulk", inline_binary_max=inline_max
                )
                yield (b"," if number else b"") + json.dumps(metadata).encode()
            yield b"]"

        return StreamingHttpResponse(datasets(), content_type=media_type)


class _PixelView(DicomwebView):
    def instance_with_pixels(self, study: str, series: str, instance: str) -> Instance | Response:
        found = self.instances_or_404(study, series, instance)
        if isinstance(found, Response):
            return found
        if not found[0].is_previewable:
            return error_response(
                f"instance {instance} has no pixel data ({found[0].sop_class_name})", status.HTTP_404_NOT_FOUND
            )
        return found[0]


def frames_response(view: _PixelView, item: Instance, numbers: list[int]) -> HttpResponse:
    """Frames as multipart/related: native pixels as application/octet-stream (Explicit
    VR Little Endian), or compressed frames as stored, in their own media type."""
    syntax = UID(item.transfer_syntax_uid)
    encoding = negotiate_frames(view.accept, item.transfer_syntax_uid)
    if encoding is FrameEncoding.STORED and syntax.is_encapsulated:
        part_type, part_syntax = FRAME_MEDIA_TYPES.get(str(syntax), OCTET_STREAM), str(syntax)
    else:
        part_type, part_syntax = OCTET_STREAM, ExplicitVRLittleEndian
    boundary = new_boundary()
    path = dicom_store().path(item.file_path)
    parts = (
        OutPart(f"{part_type}; transfer-syntax={part_syntax}", [frame]) for frame in frames(path, numbers, encoding)
    )
    return StreamingHttpResponse(
        multipart_body(parts, boundary), content_type=multipart_content_type(part_type, boundary)
    )


class FramesView(_PixelView):
    """GET .../instances/{instance}/frames/{1,2,...}: Retrieve Frames."""

    def get(self, request, study: str, series: str, instance: str, frame_list: str):
        item = self.instance_with_pixels(study, series, instance)
        if isinstance(item, Response):
            return item
        try:
            numbers = parse_frame_list(frame_list, item.number_of_frames)
        except ValueError as exc:
            return error_response(str(exc), status.HTTP_400_BAD_REQUEST)
        except IndexError as exc:
            return error_response(str(exc), status.HTTP_404_NOT_FOUND)
        return frames_response(self, item, numbers)


class BulkDataView(_PixelView):
    """GET .../instances/{instance}/bulk/{tag}: the bulk data a metadata answer points
    to: Pixel Data (7FE00010) as all its frames, or another top-level binary value (a
    waveform, an encapsulated document) as one application/octet-stream part."""

    def get(self, request, study: str, series: str, instance: str, tag: str):
        if int(tag, 16) not in PIXEL_TAGS:
            found = self.instances_or_404(study, series, instance)
            if isinstance(found, Response):
                return found
            value = bulk_data(dicom_store().path(found[0].file_path), int(tag, 16))
            if value is None:
                return error_response(
                    f"no bulk data at {tag}: not a top-level binary value of this instance", status.HTTP_404_NOT_FOUND
                )
            boundary = new_boundary()
            return StreamingHttpResponse(
                multipart_body([OutPart(OCTET_STREAM, [value])], boundary),
                content_type=multipart_content_type(OCTET_STREAM, boundary),
            )
        item = self.instance_with_pixels(study, series, instance)
        if isinstance(item, Response):
            return item
        return frames_response(self, item, list(range(1, item.number_of_frames + 1)))


class RenderedView(_PixelView):
    """GET .../instances/{instance}/rendered and .../frames/{n}/rendered: image/jpeg
    (the default) or image/png, with `window`, `viewport` and `quality` (PS3.18 8.3.5).
    A multi-frame instance renders its first frame."""

    def get(self, request, study: str, series: str, instance: str, frame_list: str = "1"):
        item = self.instance_with_pixels(study, series, instance)
        if isinstance(item, Response):
            return item
        media_type = negotiate_rendered(self.accept)
        try:
            numbers = parse_frame_list(frame_list, item.number_of_frames)
            params = parse_render_params(request.query_params.dict())
        except ValueError as exc:
            return error_response(str(exc), status.HTTP_400_BAD_REQUEST)
        except IndexError as exc:
            return error_response(str(exc), status.HTTP_404_NOT_FOUND)
        if len(numbers) != 1:
            return error_response("a rendered frame is one frame: ask for frames/{n}/rendered", 400)
        try:
            image = services.rendered_image(
                instance=item,
                frame=numbers[0],
                media_type=media_type,
                window=params.window,
                max_size=params.max_size,
                quality=params.quality,
            )
        except RenderError as exc:
            return error_response(str(exc), status.HTTP_422_UNPROCESSABLE_ENTITY)
        if isinstance(image, bytes):
            return HttpResponse(image, content_type=media_type)
        return FileResponse(image.open("rb"), content_type=media_type)
