"""REST API for triage (token or session auth): the worklist and one study's triage.

Views validate with an input serializer, call one service or selector, and return.
Errors take the project's shape {"error": "..."}: 400 for bad filters, 404 for an
unknown StudyInstanceUID.
"""

from __future__ import annotations

from typing import Any

from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.pagination import PageNumberPagination
from rest_framework.response import Response

from precedent.api import ApiView, error_response, error_responses
from studies.apis import PatientOutput
from studies.models import Study

from . import selectors, services
from .models import Category, ImageQuality, StudyRead, TriageResult

# --- serializers ---------------------------------------------------------------------


class WorklistFilterInput(serializers.Serializer):
    """The worklist filters, as query parameters; category may repeat."""

    modality = serializers.RegexField(r"^[A-Za-z0-9]{1,16}$", required=False, allow_blank=True)
    date_from = serializers.DateField(required=False)
    date_to = serializers.DateField(required=False)
    category = serializers.MultipleChoiceField(choices=Category.choices, required=False)
    include_read = serializers.BooleanField(required=False, default=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs.get("date_from") and attrs.get("date_to") and attrs["date_from"] > attrs["date_to"]:
            raise serializers.ValidationError("date_from is after date_to")
        return attrs

    def selector_filters(self) -> dict[str, Any]:
        data = self.validated_data
        return {
            "modality": data.get("modality", ""),
            "date_from": data.get("date_from"),
            "date_to": data.get("date_to"),
            "categories": sorted(data.get("category", ())),
            "include_read": data.get("include_read", False),
        }


class WorklistItemOutput(serializers.Serializer):
    """One study of the worklist (a Study annotated by selectors.worklist)."""

    study_instance_uid = serializers.CharField()
    patient = PatientOutput(source="*")
    accession_number = serializers.CharField()
    study_date = serializers.DateField(allow_null=True)
    description = serializers.CharField()
    modalities = serializers.ListField(child=serializers.CharField())
    arrived_at = serializers.DateTimeField(source="created_at")
    category = serializers.ChoiceField(choices=Category.choices)
    section = serializers.SerializerMethodField(help_text="The worklist section the category belongs to.")
    scores = serializers.SerializerMethodField(help_text="Model scores, e.g. p_abnormal; empty without a model.")
    reasons = serializers.SerializerMethodField(help_text="Why this category, most important first.")
    qa_read = serializers.BooleanField(help_text="A likely-negative study picked to be read anyway (QA).")
    triaged_at = serializers.DateTimeField(allow_null=True, help_text="When the current result was made.")
    read = serializers.SerializerMethodField()
    read_at = serializers.DateTimeField(allow_null=True)
    read_by = serializers.CharField(allow_null=True)
    url = serializers.SerializerMethodField(help_text="The study's page.")
    triage_url = serializers.SerializerMethodField(help_text="The study's triage in the API.")

    def get_section(self, obj: Study) -> str:
        return selectors.SECTIONS[obj.rank]

    @extend_schema_field(OpenApiTypes.OBJECT)
    def get_scores(self, obj: Study) -> dict[str, Any]:
        return obj.scores or {}

    def get_reasons(self, obj: Study) -> list[str]:
        return obj.reasons or []

    def get_read(self, obj: Study) -> bool:
        return obj.read_at is not None

    def get_url(self, obj: Study) -> str:
        return obj.get_absolute_url()

    def get_triage_url(self, obj: Study) -> str:
        return reverse("triage-api:study-triage", args=[obj.study_instance_uid])


class TriageResultOutput(serializers.ModelSerializer):
    reasons = serializers.ListField(child=serializers.CharField())
    model_versions = serializers.SlugRelatedField(many=True, read_only=True, slug_field="name")
    overridden_by = serializers.SlugRelatedField(
        read_only=True, allow_null=True, slug_field="username", help_text="Set when a person chose the category."
    )

    class Meta:
        model = TriageResult
        fields = [
            "category",
            "scores",
            "reasons",
            "qa_read",
            "is_current",
            "model_versions",
            "operating_point",
            "overridden_by",
            "created_at",
        ]
        read_only_fields = fields


class ImageQualityOutput(serializers.ModelSerializer):
    sop_instance_uid = serializers.CharField(source="instance.sop_instance_uid")
    reasons = serializers.ListField(child=serializers.CharField())

    class Meta:
        model = ImageQuality
        fields = ["sop_instance_uid", "assessable", "task", "reasons", "metrics", "checked_at"]
        read_only_fields = fields


class StudyTriageOutput(serializers.Serializer):
    """One study's triage (a selectors.StudyTriage)."""

    study_instance_uid = serializers.CharField(source="study.study_instance_uid")
    category = serializers.SerializerMethodField(help_text="The current category (pending before any result).")
    current = TriageResultOutput(allow_null=True)
    history = TriageResultOutput(many=True, help_text="Every result, newest first, the current one included.")
    images = ImageQualityOutput(many=True, help_text="The quality check's verdict on each image.")
    read = serializers.SerializerMethodField()
    read_at = serializers.SerializerMethodField()

    @extend_schema_field(serializers.ChoiceField(choices=Category.choices))
    def get_category(self, obj: selectors.StudyTriage) -> str:
        return obj.current.category if obj.current else Category.PENDING

    def get_read(self, obj: selectors.StudyTriage) -> bool:
        return self._mark(obj) is not None

    @extend_schema_field(serializers.DateTimeField(allow_null=True))
    def get_read_at(self, obj: selectors.StudyTriage) -> str | None:
        mark = self._mark(obj)
        return serializers.DateTimeField().to_representation(mark.read_at) if mark else None

    @staticmethod
    def _mark(obj: selectors.StudyTriage) -> StudyRead | None:
        return getattr(obj.study, "read_mark", None)


class OverrideInput(serializers.Serializer):
    category = serializers.ChoiceField(choices=services.OVERRIDE_CATEGORIES)
    note = serializers.CharField(required=False, allow_blank=True, max_length=500, default="")


STUDY_INSTANCE_UID = OpenApiParameter("study_instance_uid", str, OpenApiParameter.PATH, description="StudyInstanceUID")
NO_STUDY = "No study with that StudyInstanceUID."


# --- views ---------------------------------------------------------------------------


class WorklistPagination(PageNumberPagination):
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500


class WorklistApi(ApiView):
    """GET /api/v1/worklist/: studies in reading order (urgent, suspicious, not assessable,
    routine and pending, likely negative; then arrival). Filters: modality, date_from,
    date_to (study date, YYYY-MM-DD), category (repeatable), include_read; paginated."""

    pagination_class = WorklistPagination

    @extend_schema(
        operation_id="worklist_list",
        summary="The worklist in reading order",
        parameters=[WorklistFilterInput],
        responses={
            200: WorklistItemOutput(many=True),
            **error_responses(400, 404, _404="A page past the last one."),
        },
    )
    def get(self, request):
        filters = WorklistFilterInput(data=request.query_params)
        filters.is_valid(raise_exception=True)
        studies = selectors.worklist(**filters.selector_filters())
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(studies, request, view=self)
        return paginator.get_paginated_response(WorklistItemOutput(page, many=True).data)


class StudyTriageApi(ApiView):
    """GET /api/v1/studies/{uid}/triage/: the current result, its history (newest first)
    and each image's quality verdict. POST {"category", "note"}: set the category by hand."""

    @extend_schema(
        operation_id="studies_triage_retrieve",
        summary="One study's triage: current result, history, image quality",
        parameters=[STUDY_INSTANCE_UID],
        responses={200: StudyTriageOutput, **error_responses(404, _404=NO_STUDY)},
    )
    def get(self, request, study_instance_uid: str):
        try:
            triage = selectors.study_triage(study_instance_uid=study_instance_uid)
        except Study.DoesNotExist:
            return _no_study(study_instance_uid)
        return Response(StudyTriageOutput(triage).data)

    @extend_schema(
        operation_id="studies_triage_create",
        summary="Set a study's category by hand (audited)",
        parameters=[STUDY_INSTANCE_UID],
        request=OverrideInput,
        responses={201: StudyTriageOutput, **error_responses(400, 404, 415, _404=NO_STUDY)},
    )
    def post(self, request, study_instance_uid: str):
        data = OverrideInput(data=request.data)
        data.is_valid(raise_exception=True)
        study = Study.objects.filter(study_instance_uid=study_instance_uid).first()
        if study is None:
            return _no_study(study_instance_uid)
        services.triage_override(study=study, user=request.user, **data.validated_data)
        triage = selectors.study_triage(study_instance_uid=study_instance_uid)
        return Response(StudyTriageOutput(triage).data, status=status.HTTP_201_CREATED)


def _no_study(study_instance_uid: str) -> Response:
    return error_response(f"No study with StudyInstanceUID {study_instance_uid}", status.HTTP_404_NOT_FOUND)
