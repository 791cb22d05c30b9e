"""One request against the policy table: shared by the middleware (pages) and the DRF
permission class (REST, DICOMweb), so every door decides the same way."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest

from . import policy
from .selectors import token_scopes, user_is_admin, user_permissions


def check_request(request: HttpRequest, *, user: Any, token: Any = None) -> policy.Decision:
    """Decide `request` for `user` (authenticated by `token` when it is an API token) and
    remember the decision on the request for the audit log."""
    match = request.resolver_match
    view_name = match.view_name if match is not None else ""
    scopes = token_scopes(token=token) if token is not None else None
    decision = policy.decide(
        view_name=view_name,
        method=request.method or "GET",
        authenticated=bool(user is not None and user.is_authenticated),
        permissions=user_permissions(user=user),
        is_admin=user_is_admin(user=user),
        channel=policy.DICOMWEB if view_name.startswith("dicomweb:") else "",
        scopes=scopes,
    )
    request.access_decision = decision  # type: ignore[attr-defined]
    if scopes is not None:
        request.access_token_scopes = sorted(scopes)  # type: ignore[attr-defined]
    return decision


def request_may(request: HttpRequest, permission: str) -> bool:
    """Whether the request's user holds `permission`, narrowed by the scopes of the API
    token it came with (views that answer more or less by permission, e.g. DICOMweb
    metadata with or without the bulk data)."""
    user = getattr(request, "user", None)
    if permission not in user_permissions(user=user):
        return False
    token = getattr(request, "auth", None)
    scopes = token_scopes(token=token) if token is not None else None
    return scopes is None or permission in scopes
