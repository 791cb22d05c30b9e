"""The audit log in Django's admin: read-only (no add, change or delete, for anyone)."""

from __future__ import annotations

from django.contrib import admin

from .models import AuditEvent, TokenScope


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    list_display = ("created_at", "username", "via", "action", "target_type", "target", "outcome", "remote_addr")
    list_filter = ("action", "outcome", "via", "created_at")
    search_fields = ("username", "target", "path")
    date_hierarchy = "created_at"
    readonly_fields = [field.name for field in AuditEvent._meta.fields]
    actions = None  # "delete selected" would only meet the append-only refusal

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(TokenScope)
class TokenScopeAdmin(admin.ModelAdmin):
    list_display = ("token", "scopes", "created_at")
    readonly_fields = ("token", "created_at")
