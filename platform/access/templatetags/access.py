"""`{% load access %}` … `{% if user|can:"admin" %}`: templates ask the same policy."""

from __future__ import annotations

from typing import Any

from django import template

from ..selectors import user_permissions

register = template.Library()


@register.filter
def can(user: Any, permission: str) -> bool:
    return permission in user_permissions(user=user)
