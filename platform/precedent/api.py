"""Shared REST plumbing: one error shape for every API response, and the pieces the
OpenAPI schema (drf-spectacular) uses to describe it."""

from __future__ import annotations

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema_field
from rest_framework import exceptions, serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView
from rest_framework.views import exception_handler as drf_exception_handler


class ApiView(APIView):
    """Base for API views.

    DRF authenticates inside the view (token or session), so Django's
    LoginRequiredMiddleware must let API requests through; DRF then answers 401/403
    as JSON instead of redirecting to the login page.
    """

    @classmethod
    def as_view(cls, **initkwargs):
        return login_not_required_view(super().as_view(**initkwargs))


# Multipart framing around the files (boundaries, part headers): a file of exactly the
# limit, sent as a multipart part, must not be refused for its envelope.
MULTIPART_SLACK = 1 << 20


def body_over_limit(request) -> str | None:
    """Why a request's declared body is over PRECEDENT_MAX_UPLOAD_BYTES (checked before
    anything reads it), or None. Each file is held to the limit again as it is stored
    (storage.DicomStore.spool), so a multipart request gets its framing's worth of slack."""
    from django.conf import settings

    limit = settings.PRECEDENT_MAX_UPLOAD_BYTES
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    multipart = (request.META.get("CONTENT_TYPE") or "").lower().startswith("multipart/")
    if length > limit + (MULTIPART_SLACK if multipart else 0):
        return f"request of {length} bytes is over the upload limit of {limit} bytes"
    return None


def login_not_required_view(view):
    """A DRF view (e.g. a third-party one) that authenticates itself: let it past
    LoginRequiredMiddleware so it answers 401/403 instead of redirecting."""
    view.login_required = False
    return view


def _one_line(detail: Any) -> str:
    if isinstance(detail, dict):
        return "; ".join(f"{key}: {_one_line(value)}" for key, value in detail.items())
    if isinstance(detail, list):
        return "; ".join(_one_line(item) for item in detail)
    return str(detail)


def exception_handler(exc: Exception, context: dict) -> Response | None:
    """DRF's handler, reshaped to {"error": "<one line>"}, plus "fields" for validation
    errors; Django's own request-parsing limits answer in the same shape."""
    response = drf_exception_handler(exc, context)
    if response is None:
        return _request_limit_response(exc)
    detail = response.data
    if isinstance(exc, exceptions.ValidationError):
        response.status_code = status.HTTP_400_BAD_REQUEST
    response.data = {"error": _one_line(detail.get("detail", detail) if isinstance(detail, dict) else detail)}
    if isinstance(exc, exceptions.ValidationError):
        response.data["fields"] = detail
    return response


def error_response(message: str, status_code: int, **extra: Any) -> Response:
    return Response({"error": message, **extra}, status=status_code)


def _request_limit_response(exc: Exception) -> Response | None:
    """Django refuses a request body past its limits while DRF parses it; without this
    the client gets Django's HTML error page instead of a JSON reason."""
    from django.conf import settings
    from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent

    if isinstance(exc, TooManyFilesSent):
        limit = settings.DATA_UPLOAD_MAX_NUMBER_FILES
        return error_response(f"too many files in one request: send at most {limit} per request", 400)
    if isinstance(exc, TooManyFieldsSent):
        limit = settings.DATA_UPLOAD_MAX_NUMBER_FIELDS
        return error_response(f"too many form fields in one request: at most {limit}", 400)
    if isinstance(exc, RequestDataTooBig):
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        return error_response(f"request body over {limit:,} bytes (files go as multipart or application/dicom)", 413)
    return None


def not_found(request, exception=None):
    """handler404: API and DICOMweb clients get a JSON reason, browsers the page."""
    from django.http import JsonResponse
    from django.views.defaults import page_not_found

    if request.path.startswith(("/api/", "/dicomweb/")):
        return JsonResponse({"error": f"not found: {request.path}"}, status=404)
    return page_not_found(request, exception)


# --- OpenAPI ---------------------------------------------------------------------------


class ErrorOutput(serializers.Serializer):
    """The body of every error answer (what `exception_handler` and `error_response` make)."""

    error = serializers.CharField(help_text="What went wrong, in one line.")
    fields = serializers.DictField(
        required=False, help_text="Validation errors only: the reasons per input field, as DRF reports them."
    )


ERROR_DESCRIPTIONS = {
    400: "Invalid input (the reason is in `error`, per field in `fields`).",
    401: "No credentials, or a token or session that is not valid.",
    403: (
        "Authenticated but not allowed: the user's roles or the token's scopes do not grant it"
        " (or a session request came without its CSRF token)."
    ),
    404: "Not found.",
    409: "Conflicts with what is stored.",
    411: "A body without a Content-Length.",
    413: "The request body is over the upload limit.",
    415: "Unsupported media type.",
    422: "Understood, but the stored data cannot give what was asked.",
}


def error_responses(*codes: int, schema: Any = ErrorOutput, **descriptions: str) -> dict[int, OpenApiResponse]:
    """OpenAPI responses for the error status codes an endpoint answers, plus 401 and 403
    (every endpoint authenticates). `schema` replaces ErrorOutput for the given codes;
    `descriptions` overrides the text of one, e.g. `_404="No such study."`."""
    return {
        code: OpenApiResponse(
            schema if code in codes else ErrorOutput,
            description=descriptions.get(f"_{code}", ERROR_DESCRIPTIONS[code]),
        )
        for code in sorted({*codes, 401, 403})
    }


def rest_api_only(endpoints: list[tuple], **kwargs: Any) -> list[tuple]:
    """drf-spectacular preprocessing hook: the OpenAPI schema documents the REST API under
    /api/. DICOMweb (/dicomweb/) is specified by DICOM PS3.18 and its conformance
    statement, and its multipart/related answers are not worth an OpenAPI approximation."""
    return [endpoint for endpoint in endpoints if endpoint[0].startswith("/api/")]


@extend_schema_field(OpenApiTypes.BINARY)
class BinaryFileField(serializers.FileField):
    """A FileField documented as a multipart file part (format: binary), not as a URL."""
