from django.contrib import admin

from .models import AiDicomResult


@admin.register(AiDicomResult)
class AiDicomResultAdmin(admin.ModelAdmin):
    """The SR and SEG instances made from model output (read-only: they are made by
    the export service and stored as instances of their own)."""

    list_display = ["source", "kind", "model_version", "instance", "created_at"]
    list_filter = ["kind", "model_version"]
    raw_id_fields = ["source", "instance"]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False
