"""Writes for access: audit events, role grants, scoped API tokens.

`audit_record` is the one way an audit row is written, from the middleware (pages,
REST, DICOMweb), the auth signals (logins), the C-STORE listener (dimse) and commands.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser, Group, Permission
from django.db import transaction
from django.http import HttpRequest
from rest_framework.authtoken.models import Token

from . import policy
from .models import AuditEvent, Outcome, TokenScope, Via
from .selectors import user_roles

log = logging.getLogger(__name__)

# Longest values kept in a row; a longer path or target is cut, never refused.
_MAX_TARGET = AuditEvent._meta.get_field("target").max_length
_MAX_PATH = 2000


class AccessError(ValueError):
    """A role or token request that cannot be carried out; the message says why."""


# --- audit ---------------------------------------------------------------------------


def request_via(request: HttpRequest) -> str:
    """Which door a request came through, from its path."""
    path = request.path_info or request.path
    if path.startswith("/dicomweb/"):
        return Via.DICOMWEB
    if path.startswith("/api/"):
        return Via.REST
    return Via.PAGE


def client_address(request: HttpRequest) -> str:
    """The peer's address as the server saw it. X-Forwarded-For is not trusted: anyone
    can send it; behind a proxy, set REMOTE_ADDR there (e.g. gunicorn --forwarded-allow-ips)."""
    return request.META.get("REMOTE_ADDR", "")


def audit_record(
    *,
    action: str,
    request: HttpRequest | None = None,
    user: AbstractBaseUser | AnonymousUser | None = None,
    via: str = "",
    target_type: str = "",
    target: str = "",
    details: dict[str, Any] | None = None,
    outcome: str = "ok",
    status_code: int | None = None,
    remote_addr: str = "",
    username: str = "",
) -> AuditEvent:
    """Append one audit event and return it.

    With `request` (Django's or DRF's), the user (unless given), address, method, path
    and door (`via`, unless given) come from it, and the middleware writes no second row
    for that request. `outcome` is "ok", "denied" or "error". `username`
    names an actor that is no user account (e.g. "AE MODALITY" for a DICOM sender).
    """
    if outcome not in Outcome.values:
        raise ValueError(f"outcome must be one of {', '.join(Outcome.values)}, got {outcome!r}")
    if request is not None:
        if user is None:
            user = getattr(request, "user", None)
        via = via or request_via(request)
        remote_addr = remote_addr or client_address(request)
        method = request.method or ""
        path = request.get_full_path()[:_MAX_PATH]
    else:
        method = path = ""
    known = user if user is not None and user.is_authenticated else None
    if request is not None:
        # The view wrote its own (richer) row: the middleware adds none for this request.
        getattr(request, "_request", request).access_audited = True
    return AuditEvent.objects.create(
        user=known,
        username=known.get_username() if known else username[:150],
        roles=user_roles(user=known) if known else [],
        remote_addr=remote_addr[:128],
        via=via,
        action=action[:32],
        target_type=target_type[:32],
        target=str(target)[:_MAX_TARGET],
        outcome=outcome,
        method=method,
        path=path,
        status_code=status_code,
        details=details or {},
    )


# --- roles ---------------------------------------------------------------------------

# Django admin permissions an admin's group carries, so admins manage users in /admin/.
_ADMIN_MODEL_PERMISSIONS = (("auth", "user"), ("auth", "group"), ("authtoken", "token"))
_ADMIN_VIEW_PERMISSIONS = (("access", "auditevent"), ("access", "tokenscope"))


def role_group(role: str) -> Group:
    """The Group of a role, created if missing (a flushed test database has none)."""
    if role not in policy.ROLES:
        raise AccessError(f"unknown role {role!r}; roles are {', '.join(policy.ROLES)}")
    group, _ = Group.objects.get_or_create(name=role)
    if role == policy.ADMIN_ROLE:
        wanted = Permission.objects.filter(
            content_type__app_label__in=[app for app, _ in _ADMIN_MODEL_PERMISSIONS],
            content_type__model__in=[model for _, model in _ADMIN_MODEL_PERMISSIONS],
        ) | Permission.objects.filter(
            content_type__app_label="access",
            content_type__model__in=[model for _, model in _ADMIN_VIEW_PERMISSIONS],
            codename__startswith="view_",
        )
        group.permissions.add(*wanted)
    return group


@transaction.atomic
def role_grant(*, user: AbstractBaseUser, roles: Iterable[str]) -> list[str]:
    """Give a user roles; admins also become staff (Django's admin site needs it).
    Returns the user's roles afterwards."""
    groups = [role_group(role) for role in roles]
    user.groups.add(*groups)
    if any(group.name == policy.ADMIN_ROLE for group in groups) and not user.is_staff:
        user.is_staff = True
        user.save(update_fields=["is_staff"])
    _forget_roles(user)
    return user_roles(user=user)


@transaction.atomic
def role_revoke(*, user: AbstractBaseUser, roles: Iterable[str]) -> list[str]:
    """Take roles away (an admin losing the role loses staff status, unless superuser)."""
    groups = [role_group(role) for role in roles]
    user.groups.remove(*groups)
    _forget_roles(user)
    remaining = user_roles(user=user)
    if policy.ADMIN_ROLE not in remaining and user.is_staff and not user.is_superuser:
        user.is_staff = False
        user.save(update_fields=["is_staff"])
    return remaining


def _forget_roles(user: AbstractBaseUser) -> None:
    user.__dict__.pop("_access_roles", None)


# --- tokens --------------------------------------------------------------------------


@transaction.atomic
def api_token_create(*, user: AbstractBaseUser, scopes: Iterable[str] = ()) -> Token:
    """A new API token for `user`, narrowed to `scopes` when any are given.

    authtoken allows one token per user, so this replaces the user's previous token.
    """
    scopes = sorted(set(scopes))
    unknown = [scope for scope in scopes if scope not in policy.TOKEN_SCOPES]
    if unknown:
        raise AccessError(f"unknown scope {unknown[0]!r}; scopes are {', '.join(policy.TOKEN_SCOPES)}")
    Token.objects.filter(user=user).delete()
    token = Token.objects.create(user=user)
    if scopes:
        TokenScope.objects.create(token=token, scopes=scopes)
    return token


def api_token_revoke(*, user: AbstractBaseUser) -> bool:
    deleted, _ = Token.objects.filter(user=user).delete()
    return bool(deleted)


# --- demo ----------------------------------------------------------------------------


@transaction.atomic
def demo_role_users(*, password: str, prefix: str = "demo-") -> list[str]:
    """One user per role (demo-radiologist, ...) with the demo password, for trying
    what each role may do. Idempotent: an existing user keeps its password."""
    from django.contrib.auth import get_user_model

    user_model = get_user_model()
    names = []
    for role in policy.ROLES:
        name = f"{prefix}{role}"
        person, created = user_model.objects.get_or_create(username=name)
        if created:
            person.set_password(password)
            person.save(update_fields=["password"])
        role_grant(user=person, roles=[role])
        names.append(name)
    return names
