"""Logins, logouts and failed logins go to the audit log (Django's auth signals)."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.dispatch import receiver

from .models import Outcome
from .services import audit_record


@receiver(user_logged_in, dispatch_uid="access.audit_login")
def audit_login(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    # force_login in tests and the admin's own login arrive here too; both are logins.
    audit_record(action="login", request=request, user=user, target_type="user", target=user.get_username())


@receiver(user_logged_out, dispatch_uid="access.audit_logout")
def audit_logout(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    if user is None:  # a logout without a session logged nobody out
        return
    audit_record(action="logout", request=request, user=user, target_type="user", target=user.get_username())


@receiver(user_login_failed, dispatch_uid="access.audit_login_failed")
def audit_login_failed(sender: Any, credentials: dict[str, Any], request: Any = None, **kwargs: Any) -> None:
    # Credentials arrive with the password already masked by Django; only the name is kept.
    username = str(credentials.get("username", ""))
    audit_record(
        action="login",
        request=request,
        outcome=Outcome.DENIED,
        target_type="user",
        target=username,
        details={"reason": "wrong username or password"},
    )
