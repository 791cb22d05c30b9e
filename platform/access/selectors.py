"""Reads for access: a user's roles and permissions, a token's scopes, audit events."""

from __future__ import annotations

import datetime as dt

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import QuerySet
from rest_framework.authtoken.models import Token

from . import policy
from .models import AuditEvent, TokenScope


def user_roles(*, user: AbstractBaseUser | AnonymousUser | None) -> list[str]:
    """The user's roles (sorted), cached on the user object for the request.
    Superusers count as admins whether or not they are in the group."""
    if user is None or not user.is_authenticated:
        return []
    cached = user.__dict__.get("_access_roles")
    if cached is None:
        cached = remember_roles(user, user.groups.filter(name__in=list(policy.ROLES)).values_list("name", flat=True))
    return list(cached)


def remember_roles(user: AbstractBaseUser, group_names) -> list[str]:
    """Cache the user's roles (from their role group names) on the user object for the
    request; what user_roles answers from then on."""
    names = set(group_names or ())
    if user.is_superuser:
        names.add(policy.ADMIN_ROLE)
    roles = sorted(names)
    user.__dict__["_access_roles"] = roles
    return roles


def user_permissions(*, user: AbstractBaseUser | AnonymousUser | None) -> frozenset[str]:
    if user is None or not user.is_authenticated:
        return frozenset()
    return policy.role_permissions(user_roles(user=user), superuser=user.is_superuser)


def user_is_admin(*, user: AbstractBaseUser | AnonymousUser | None) -> bool:
    return policy.ADMIN in user_permissions(user=user)


def token_scopes(*, token: object) -> frozenset[str] | None:
    """The scopes of a DRF token, or None when it is not narrowed (or not a token)."""
    key = getattr(token, "key", None)
    if key is None:
        return None
    if isinstance(token, Token):  # the scope row came with the token (access.authentication)
        try:
            return frozenset(token.scope.scopes)
        except TokenScope.DoesNotExist:
            return None
    scopes = TokenScope.objects.filter(token_id=key).values_list("scopes", flat=True).first()
    return None if scopes is None else frozenset(scopes)


def audit_events(
    *,
    username: str = "",
    action: str = "",
    outcome: str = "",
    via: str = "",
    since: dt.date | dt.datetime | None = None,
    until: dt.date | dt.datetime | None = None,
) -> QuerySet[AuditEvent]:
    """Audit events, newest first, filtered; `until` as a date includes that whole day."""
    events = AuditEvent.objects.all()
    if username:
        events = events.filter(username=username)
    if action:
        events = events.filter(action=action)
    if outcome:
        events = events.filter(outcome=outcome)
    if via:
        events = events.filter(via=via)
    if since is not None:
        events = events.filter(created_at__date__gte=since) if _is_date(since) else events.filter(created_at__gte=since)
    if until is not None:
        events = events.filter(created_at__date__lte=until) if _is_date(until) else events.filter(created_at__lte=until)
    return events.order_by("-created_at", "-id")


def _is_date(value: dt.date | dt.datetime) -> bool:
    return isinstance(value, dt.date) and not isinstance(value, dt.datetime)
