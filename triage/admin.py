"""Admin for triage rows. Results, quality verdicts and the audit trail are written by
the services only, so they are read-only here; model versions and operating points
are made by the train and calibrate commands (sign-off gets its own page), and model
versions are switched by the admin actions or `triage_model activate`, audited."""

from __future__ import annotations

from django.contrib import admin, messages

from . import services
from .models import (
    Detection,
    ImageQuality,
    LocalisationRun,
    OperatingPoint,
    SegmentationMask,
    StudyRead,
    TriageAudit,
    TriageModelVersion,
    TriageResult,
)


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        """Not on their own: deleting a current result or a signed-off point would
        change triage with no triage audit entry, and these rows change only through the
        audited services. They still go with the study or image they belong to when an
        admin deletes that (Django asks each related model's admin while collecting)."""
        url_name = getattr(getattr(request, "resolver_match", None), "url_name", None) or ""
        if url_name.startswith(f"{self.opts.app_label}_{self.opts.model_name}_"):
            return False
        return super().has_delete_permission(request, obj)


@admin.register(TriageModelVersion)
class TriageModelVersionAdmin(admin.ModelAdmin):
    list_display = ["name", "kind", "architecture", "status", "created_at", "activated_at"]
    list_filter = ["kind", "status"]
    search_fields = ["name", "sha256"]
    # The status changes only through the actions below: the service retires the
    # previous version of the kind and audits the switch (an edited field would do
    # neither, and a second active version of a kind is refused by the database).
    readonly_fields = ["kind", "status", "weights_path", "sha256", "created_at", "activated_at"]
    actions = ["activate", "retire"]

    def has_add_permission(self, request) -> bool:
        return False  # versions are registered by train_triage, with their weights file

    def has_delete_permission(self, request, obj=None) -> bool:
        # Results name the versions that made them: retire a version, never delete it.
        return False

    @admin.action(description="Activate the selected version (the active one of its kind is retired)")
    def activate(self, request, queryset) -> None:
        if queryset.count() != 1:
            self.message_user(request, "Select exactly one version to activate.", level=messages.ERROR)
            return
        version = services.triage_model_activate(version=queryset.get(), user=request.user, via="page", request=request)
        self.message_user(request, f"{version.kind} {version.name} is active.")

    @admin.action(description="Retire the selected versions (what needs them waits as pending)")
    def retire(self, request, queryset) -> None:
        retired = []
        for version in queryset.filter(status=TriageModelVersion.Status.ACTIVE):
            services.triage_model_retire(version=version, user=request.user, via="page", request=request)
            retired.append(version.name)
        self.message_user(request, f"Retired: {', '.join(retired) or 'none (no selected version was active)'}.")


@admin.register(OperatingPoint)
class OperatingPointAdmin(ReadOnlyAdmin):
    list_display = [
        "score_source", "threshold", "sensitivity", "specificity", "workload_reduction", "validation_cohort",
        "computed_at", "signed_off_by", "signed_off_at",
    ]  # fmt: skip
    list_filter = ["signed_off_at", "score_source"]


@admin.register(TriageResult)
class TriageResultAdmin(ReadOnlyAdmin):
    list_display = ["study", "category", "is_current", "qa_read", "overridden_by", "created_at"]
    list_filter = ["category", "is_current", "qa_read"]
    search_fields = ["study__study_instance_uid", "study__accession_number", "study__patient__patient_id"]
    raw_id_fields = ["study"]


@admin.register(ImageQuality)
class ImageQualityAdmin(ReadOnlyAdmin):
    list_display = ["instance", "assessable", "task", "reasons", "checked_at"]
    list_filter = ["assessable", "task"]
    search_fields = ["instance__sop_instance_uid"]


@admin.register(StudyRead)
class StudyReadAdmin(admin.ModelAdmin):
    list_display = ["study", "user", "read_at"]
    search_fields = ["study__study_instance_uid"]
    raw_id_fields = ["study", "user"]


@admin.register(TriageAudit)
class TriageAuditAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "action", "user", "study", "operating_point", "note"]
    list_filter = ["action"]

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Detection)
class DetectionAdmin(ReadOnlyAdmin):
    list_display = ["instance", "label", "score", "x0", "y0", "x1", "y1", "model_version", "created_at"]
    list_filter = ["label", "model_version"]
    search_fields = ["instance__sop_instance_uid"]
    raw_id_fields = ["instance"]


@admin.register(SegmentationMask)
class SegmentationMaskAdmin(ReadOnlyAdmin):
    list_display = ["instance", "label", "area_fraction", "model_version", "mask_path", "created_at"]
    list_filter = ["label", "model_version"]
    search_fields = ["instance__sop_instance_uid"]
    raw_id_fields = ["instance"]


@admin.register(LocalisationRun)
class LocalisationRunAdmin(ReadOnlyAdmin):
    list_display = ["instance", "model_version", "outputs", "seconds", "created_at"]
    list_filter = ["model_version"]
    search_fields = ["instance__sop_instance_uid"]
    raw_id_fields = ["instance"]
