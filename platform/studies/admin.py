from django.contrib import admin

from .models import Cohort, CohortMembership, Finding, Instance, Patient, Series, Study


@admin.register(Patient)
class PatientAdmin(admin.ModelAdmin):
    list_display = ["patient_id", "display_name", "sex", "birth_date", "created_at"]
    search_fields = ["patient_id", "name"]


class SeriesInline(admin.TabularInline):
    model = Series
    fields = ["series_instance_uid", "modality", "series_number", "description", "body_part"]
    extra = 0
    show_change_link = True


@admin.register(Study)
class StudyAdmin(admin.ModelAdmin):
    list_display = ["study_instance_uid", "patient", "study_date", "accession_number", "description", "created_at"]
    list_filter = ["study_date", "cohorts"]
    search_fields = ["study_instance_uid", "accession_number", "patient__patient_id", "patient__name"]
    raw_id_fields = ["patient"]
    inlines = [SeriesInline]


class InstanceInline(admin.TabularInline):
    model = Instance
    fields = ["sop_instance_uid", "instance_number", "rows", "columns", "number_of_frames", "transfer_syntax_uid"]
    extra = 0
    show_change_link = True


@admin.register(Series)
class SeriesAdmin(admin.ModelAdmin):
    list_display = ["series_instance_uid", "study", "modality", "series_number", "body_part", "manufacturer"]
    list_filter = ["modality"]
    search_fields = ["series_instance_uid", "study__study_instance_uid"]
    raw_id_fields = ["study"]
    inlines = [InstanceInline]


class FindingInline(admin.TabularInline):
    model = Finding
    fields = ["pathology", "abnormality_class", "x0", "y0", "x1", "y1", "source", "source_key"]
    extra = 0


@admin.register(Instance)
class InstanceAdmin(admin.ModelAdmin):
    list_display = ["sop_instance_uid", "series", "rows", "columns", "number_of_frames", "size", "created_at"]
    list_filter = ["series__modality", "has_pixel_data"]
    search_fields = ["sop_instance_uid", "sha256", "series__series_instance_uid"]
    raw_id_fields = ["series"]
    readonly_fields = ["file_path", "sha256", "size", "transfer_syntax_uid"]
    inlines = [FindingInline]


@admin.register(Finding)
class FindingAdmin(admin.ModelAdmin):
    list_display = ["instance", "pathology", "abnormality_class", "box", "source", "created_at"]
    list_filter = ["pathology", "abnormality_class", "source"]
    search_fields = ["instance__sop_instance_uid", "source_key"]
    raw_id_fields = ["instance", "created_by"]


class CohortMembershipInline(admin.TabularInline):
    model = CohortMembership
    raw_id_fields = ["study"]
    extra = 0


@admin.register(Cohort)
class CohortAdmin(admin.ModelAdmin):
    list_display = ["name", "description", "created_at"]
    search_fields = ["name"]
    inlines = [CohortMembershipInline]
