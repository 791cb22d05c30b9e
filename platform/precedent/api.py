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


def body_over_limit(request) -> str | None:
    """Why a request's declared body is over PRECEDENT_MAX_UPLOAD_BYTES (checked before
    anything reads it), or None."""
    from django.conf import settings

    limit = settings.PRECEDENT_MAX_UPLOAD_BYTES
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length > limit:
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
    """DRF's handler, reshaped to {"error": "<one line>"}, plus "fields" for validation errors."""
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    detail = response.data
    if isinstance(exc, exceptions.ValidationError):
        response.status_code = status.HTTP_400_BAD_REQUEST
    response.data = {"error": _one_line(detail.get("detail", detail) if isinstance(detail, dict) else detail)}
    if isinstance(exc, exceptions.ValidationError):
        response.data["fields"] = detail
    return response


def error_response(message: str, status_code: int, **extra: Any) -> Response:
    return Response({"error": message, **extra}, status=status_code)


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
