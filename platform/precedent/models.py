"""What the platform itself keeps in PostgreSQL (the apps keep their own)."""

from __future__ import annotations

from django.contrib.postgres.fields import ArrayField
from django.db import models
from django.db.models import Q


class WaitingJob(models.Model):
    """A background job handed to Celery that equal jobs may still join.

    The in-process worker coalesces waiting jobs in memory (precedent.tasks); with
    Celery the web processes that queue jobs and the worker that runs them are
    different processes, so the waiting job lives here: equal jobs merge their ids
    into its row and push its start back (settle), and one Celery task runs it when
    it is due. A row is claimed when its run starts and deleted when the run ends;
    what arrives meanwhile makes a new row and a run of its own.
    """

    key = models.TextField(help_text="the job's name and its arguments other than the merged list")
    name = models.CharField(max_length=100)
    kwargs = models.JSONField(default=dict, blank=True)
    ids = ArrayField(models.BigIntegerField(), default=list, blank=True, help_text="the merged list, if it merges")
    due = models.DateTimeField(help_text="when it may start")
    latest = models.DateTimeField(help_text="settling never pushes `due` past this")
    claimed_at = models.DateTimeField(null=True, blank=True, help_text="when its run started")

    class Meta:
        constraints = [
            # One open (not started) job per key: that is the row equal jobs join.
            models.UniqueConstraint(fields=["key"], condition=Q(claimed_at__isnull=True), name="waiting_job_open_key")
        ]

    def __str__(self) -> str:
        return f"{self.key} due {self.due:%H:%M:%S}"
