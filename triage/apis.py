"""REST API for triage (token or session auth): the worklist and one study's triage.

Views validate with an input serializer, call one service or selector, and return.
Errors take the project's shape {"error": "..."}: 400 for bad filters, 404 for an
unknown StudyInstanceUID.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings
from django.http import HttpResponse
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.pagination import PageNumberPagination
from rest_framework.response import Response

from precedent.api import ApiView, error_response, error_responses
from studies.apis import PatientOutput, _AnyAccept
from studies.models import Instance, Study

from . import localisation, overlays, selectors, services
from .models import Category, ImageQuality, SegmentationMask, StudyRead, TriageResult

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
    section = serializers.SerializerMethodField(
        help_text="The worklist section the study is read in: its category's, except that a not-assessable "
        "study no triage task covers (a CT, a report) is read with routine studies, by arrival."
    )
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


# --- overlays: model boxes, ground truth and masks on one image ------------------------------


class OverlaysInput(serializers.Serializer):
    min_score = serializers.FloatField(
        required=False, default=0.0, min_value=0.0, max_value=1.0, help_text="Leave out model boxes scoring less."
    )


class OverlayBoxOutput(serializers.Serializer):
    x0 = serializers.FloatField(help_text="Image pixels, top-left origin; x1/y1 exclusive.")
    y0 = serializers.FloatField()
    x1 = serializers.FloatField()
    y1 = serializers.FloatField()
    label = serializers.CharField(help_text="Class (model) or pathology and class (ground truth).")
    score = serializers.FloatField(allow_null=True, help_text="Model score; null for ground truth.")
    source = serializers.CharField(help_text='"model:<version name>", "dataset" or "radiologist".')
    pathology = serializers.CharField(help_text='Ground truth: "normal", "benign", "malignant"…; "" for model boxes.')
    colour = serializers.SerializerMethodField()

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        # "class" is a Python keyword, so it cannot be declared above.
        fields["class"] = serializers.CharField(
            source="abnormality_class", help_text="The model's class, or the finding's abnormality class."
        )
        return fields

    def get_colour(self, obj: localisation.OverlayBox) -> str:
        return overlays.hex_colour(overlays.label_colour(obj.label if obj.score is not None else "ground-truth"))


class OverlayMaskOutput(serializers.Serializer):
    label = serializers.CharField()
    source = serializers.SerializerMethodField(help_text='"model:<version name>".')
    url = serializers.SerializerMethodField(help_text="RGBA PNG with the image's rows × columns, to lay over it.")
    colour = serializers.SerializerMethodField()
    area_fraction = serializers.FloatField(help_text="Share of the image inside the mask.")

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        fields["class"] = serializers.CharField(source="label", help_text="The segmenter's class (as label).")
        return fields

    def get_source(self, obj: SegmentationMask) -> str:
        return f"model:{obj.model_version.name}"

    def get_url(self, obj: SegmentationMask) -> str:
        return reverse("triage-api:instance-mask", args=[obj.instance.sop_instance_uid, obj.pk])

    def get_colour(self, obj: SegmentationMask) -> str:
        return overlays.hex_colour(overlays.label_colour(obj.label))


class OverlaysOutput(serializers.Serializer):
    sop_instance_uid = serializers.CharField(source="instance.sop_instance_uid")
    rows = serializers.IntegerField(source="instance.rows", allow_null=True)
    columns = serializers.IntegerField(source="instance.columns", allow_null=True)
    boxes = OverlayBoxOutput(many=True)
    masks = OverlayMaskOutput(many=True)


SOP_INSTANCE_UID = OpenApiParameter("sop_instance_uid", str, OpenApiParameter.PATH, description="SOPInstanceUID")


def _instance_or_404(sop_instance_uid: str) -> Instance | Response:
    instance = Instance.objects.filter(sop_instance_uid=sop_instance_uid).first()
    if instance is None:
        return error_response(f"no instance with SOPInstanceUID {sop_instance_uid}", status.HTTP_404_NOT_FOUND)
    return instance


class InstanceOverlaysApi(ApiView):
    """GET /api/v1/instances/{uid}/overlays/: what the viewer draws over one image:
    ground-truth finding boxes, the detector's boxes (class, score) and the
    segmenter's masks (as URLs of RGBA PNGs), all in the image's pixel frame."""

    @extend_schema(
        operation_id="instances_overlays_retrieve",
        summary="Detection boxes, ground-truth boxes and segmentation masks of one image",
        parameters=[SOP_INSTANCE_UID, OverlaysInput],
        responses={200: OverlaysOutput, **error_responses(400, 404, _404="No instance with that SOPInstanceUID.")},
    )
    def get(self, request, sop_instance_uid: str):
        params = OverlaysInput(data=request.query_params)
        params.is_valid(raise_exception=True)
        instance = _instance_or_404(sop_instance_uid)
        if isinstance(instance, Response):
            return instance
        found = localisation.instance_overlays(instance=instance, min_score=params.validated_data["min_score"])
        return Response(OverlaysOutput(found).data)


class InstanceMaskApi(ApiView):
    """GET /api/v1/instances/{uid}/masks/{id}.png: one stored mask as a semi-transparent
    RGBA PNG in its label's colour, with the image's rows × columns."""

    content_negotiation_class = _AnyAccept

    @extend_schema(
        operation_id="instances_mask_png",
        summary="A segmentation mask as an RGBA PNG overlay",
        parameters=[SOP_INSTANCE_UID, OpenApiParameter("mask_id", int, OpenApiParameter.PATH)],
        responses={
            (200, "image/png"): OpenApiResponse(OpenApiTypes.BINARY, description="RGBA PNG, transparent outside."),
            **{
                (code, "application/json"): response
                for code, response in error_responses(404, _404="No such mask on that instance.").items()
            },
        },
    )
    def get(self, request, sop_instance_uid: str, mask_id: str):
        # Routed as a string so that any id, however malformed, gets this JSON 404
        # rather than the HTML one of an unmatched URL.
        mask = None
        if mask_id.isascii() and mask_id.isdigit() and len(mask_id) < 19:
            mask = SegmentationMask.objects.filter(pk=int(mask_id), instance__sop_instance_uid=sop_instance_uid).first()
        if mask is None:
            return error_response(f"no mask {mask_id} on instance {sop_instance_uid}", status.HTTP_404_NOT_FOUND)
        path = Path(settings.PRECEDENT_HOME) / mask.mask_path
        try:
            stored = overlays.read_mask(path)
        except (OSError, ValueError):
            return error_response(f"the file of mask {mask_id} is missing or unreadable", status.HTTP_404_NOT_FOUND)
        png = overlays.encode_png(overlays.mask_rgba(stored, overlays.label_colour(mask.label)))
        response = HttpResponse(png, content_type="image/png")
        # A stored mask never changes (a new model version makes new rows).
        response["Cache-Control"] = "private, max-age=86400"
        return response
