"""Shared REST plumbing: one error shape for every API response."""

from __future__ import annotations

from typing import Any

from rest_framework import exceptions, status
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
    """DRF's handler, reshaped to {"error": "<one line>", "detail": <original>}."""
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
