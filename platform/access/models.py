"""The audit log (append-only) and the scope restriction of an API token.

An AuditEvent is written once and never changed: `save` refuses an existing row,
`delete` and the queryset's `update`/`delete` refuse outright, and a PostgreSQL trigger
(migration 0001) rejects UPDATE and DELETE on the table for anyone who bypasses the
ORM. TRUNCATE is not blocked: it needs table ownership, which a production deployment
keeps away from the application's database role, and the test runner relies on it.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.db import models
from rest_framework.authtoken.models import Token


class AppendOnlyError(Exception):
    """An attempt to change or delete an audit event."""


class Via(models.TextChoices):
    PAGE = "page", "page"
    REST = "rest", "REST API"
    DICOMWEB = "dicomweb", "DICOMweb"
    DIMSE = "dimse", "DICOM network (DIMSE)"
    COMMAND = "command", "management command"


class Outcome(models.TextChoices):
    OK = "ok", "ok"
    DENIED = "denied", "denied"
    ERROR = "error", "error"


class AuditEventQuerySet(models.QuerySet):
    def update(self, **kwargs):
        raise AppendOnlyError("audit events are append-only: update refused")

    def delete(self):
        raise AppendOnlyError("audit events are append-only: delete refused")

    # bulk_update goes through update(); _raw_delete is what Collector uses for fast deletes.
    def _raw_delete(self, using):
        raise AppendOnlyError("audit events are append-only: delete refused")


class AuditEvent(models.Model):
    """Who did what to which target, when, from where, through which door, and how it went."""

    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    # No foreign-key constraint and no cascade: deleting a user must neither fail on
    # nor rewrite their audit history. `username` keeps the name as it was then.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        null=True,
        blank=True,
        related_name="+",
    )
    username = models.CharField(max_length=150, blank=True, db_index=True)
    roles = ArrayField(models.CharField(max_length=32), default=list, blank=True)
    remote_addr = models.CharField(max_length=128, blank=True, help_text="IP address, or host:port for DIMSE")
    via = models.CharField(max_length=16, choices=Via.choices, blank=True)
    action = models.CharField(max_length=32, db_index=True)
    target_type = models.CharField(max_length=32, blank=True)
    target = models.CharField(max_length=255, blank=True, db_index=True)
    outcome = models.CharField(max_length=8, choices=Outcome.choices, default=Outcome.OK)
    method = models.CharField(max_length=10, blank=True)
    path = models.TextField(blank=True)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    details = models.JSONField(default=dict, blank=True)

    objects = AuditEventQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["action", "created_at"], name="audit_action_time_idx")]

    def __str__(self) -> str:
        who = self.username or "anonymous"
        when = f"{self.created_at:%Y-%m-%d %H:%M:%S}"
        return f"{when} {who} {self.action} {self.target_type} {self.target} {self.outcome}"

    def save(self, *args, **kwargs):
        if not self._state.adding:
            raise AppendOnlyError("audit events are append-only: update refused")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise AppendOnlyError("audit events are append-only: delete refused")


class TokenScope(models.Model):
    """Narrows one DRF token to some permissions (and channels).

    A token without a TokenScope acts with every permission of its user's roles (what
    `drf_create_token` makes); with one, only with those of its `scopes` that the roles
    also grant, and on DICOMweb only when "dicomweb" is among them.
    """

    token = models.OneToOneField(Token, on_delete=models.CASCADE, related_name="scope", primary_key=True)
    scopes = ArrayField(models.CharField(max_length=32), default=list)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.token.user} token: {', '.join(self.scopes) or '(no scopes)'}"
