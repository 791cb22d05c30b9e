from django.contrib import admin

from .models import WaitingJob


@admin.register(WaitingJob)
class WaitingJobAdmin(admin.ModelAdmin):
    """Celery jobs waiting for equal jobs to settle: read-only (the worker owns them),
    deletable so that an administrator can drop a job whose task the broker lost."""

    list_display = ["name", "key", "due", "claimed_at"]
    list_filter = ["name"]
    readonly_fields = ["key", "name", "kwargs", "ids", "due", "latest", "claimed_at"]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False
