"""/api/v1/ routes: de-identified export (a zip) and AI results as DICOM SR/SEG."""

from __future__ import annotations

from django.http import FileResponse
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response

from precedent.api import ApiView, error_response, error_responses

from . import services
from .models import AiDicomResult
from .services import DeidExport, ExportError


class DeidExportInput(serializers.Serializer):
    study_instance_uids = serializers.ListField(
        child=serializers.CharField(max_length=64), required=False, default=list, help_text="Whole studies"
    )
    sop_instance_uids = serializers.ListField(
        child=serializers.CharField(max_length=64),
        required=False,
        default=list,
        help_text="Single instances, e.g. a set of search results",
    )

    def validate(self, attrs):
        if not attrs["study_instance_uids"] and not attrs["sop_instance_uids"]:
            raise serializers.ValidationError("give study_instance_uids or sop_instance_uids (or both)")
        return attrs


def audit_export(request, *, kind: str, target_type: str, target: str, outcome: str = "ok", **details) -> None:
    """Every export is audited, refused ones too (with the reason)."""
    from access.services import audit_record

    audit_record(
        action="export",
        request=request,
        target_type=target_type,
        target=target,
        details={"export": kind, **details},
        outcome=outcome,
    )


def export_response(export: DeidExport) -> FileResponse:
    response = FileResponse(export.file, content_type="application/zip", as_attachment=True, filename=export.filename)
    response["Content-Length"] = str(export.size)
    response["X-Export-Instances"] = str(export.instances)
    response["X-Export-Excluded-Burned-In"] = str(export.excluded_burned_in)
    return response


def deid_export(request, *, study_instance_uids: list[str], sop_instance_uids: list[str]):
    """Select, build, audit: shared by the REST endpoint and the page buttons. Returns the
    zip response, or raises ExportError (audited as an error) for the caller to answer."""
    target_type = "study" if study_instance_uids and not sop_instance_uids else "instances"
    target = ",".join([*study_instance_uids, *sop_instance_uids])
    try:
        instances = services.export_instances(
            study_instance_uids=study_instance_uids, sop_instance_uids=sop_instance_uids
        )
        export = services.deid_export_build(instances=instances)
    except ExportError as exc:
        audit_export(request, kind="deid", target_type=target_type, target=target, outcome="error", reason=exc.reason)
        raise
    audit_export(
        request,
        kind="deid",
        target_type=target_type,
        target=target,
        studies=export.studies,
        series=export.series,
        instances=export.instances,
        excluded_burned_in=export.excluded_burned_in,
    )
    return export_response(export)


class DeidExportApi(ApiView):
    """POST /api/v1/exports/deid/: a zip of the selection de-identified (PS3.15 basic profile)."""

    @extend_schema(
        operation_id="exports_deid",
        summary="De-identified research export (zip of DICOM)",
        description=(
            "The studies or instances named, de-identified per DICOM PS3.15 Annex E (basic profile) with UIDs"
            " remapped consistently within the export, as a zip: `<study>/<series>/<instance>.dcm` (new UIDs)"
            " and `manifest.csv` (new UIDs and counts only). Instances with Burned In Annotation YES are left"
            " out and counted in `X-Export-Excluded-Burned-In`. Audited."
        ),
        request=DeidExportInput,
        responses={
            (200, "application/zip"): OpenApiResponse(OpenApiTypes.BINARY, description="The zip, as an attachment."),
            **{(code, "application/json"): r for code, r in error_responses(400, 404).items()},
        },
    )
    def post(self, request):
        data = DeidExportInput(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            return deid_export(
                request,
                study_instance_uids=data.validated_data["study_instance_uids"],
                sop_instance_uids=data.validated_data["sop_instance_uids"],
            )
        except ExportError as exc:
            return error_response(exc.reason, exc.http_status)


class AiResultsInput(serializers.Serializer):
    """The path names the image; its latest model results are used."""

    kinds = serializers.ListField(
        child=serializers.ChoiceField(choices=AiDicomResult.Kind.choices),
        required=False,
        default=["sr", "seg"],
        allow_empty=False,
        help_text="Which to store: sr (detections), seg (masks); default both",
    )


class AiResultOutput(serializers.Serializer):
    kind = serializers.ChoiceField(choices=AiDicomResult.Kind.choices)
    model_version = serializers.CharField()
    sop_instance_uid = serializers.CharField()
    series_instance_uid = serializers.CharField()
    study_instance_uid = serializers.CharField()
    sop_class_uid = serializers.CharField()
    created = serializers.BooleanField(help_text="False when it was stored before (idempotent)")
    file_url = serializers.CharField()
    wado_url = serializers.CharField(help_text="WADO-RS URL of the instance")


class AiResultsOutput(serializers.Serializer):
    source_sop_instance_uid = serializers.CharField()
    results = AiResultOutput(many=True)


def ai_result_payload(request, result: services.StoredAiResult) -> dict:
    instance = result.instance
    series = instance.series
    study = series.study
    wado = reverse(
        "dicomweb:instance",
        kwargs={
            "study": study.study_instance_uid,
            "series": series.series_instance_uid,
            "instance": instance.sop_instance_uid,
        },
    )
    return {
        "kind": result.kind,
        "model_version": result.model_version.name,
        "sop_instance_uid": instance.sop_instance_uid,
        "series_instance_uid": series.series_instance_uid,
        "study_instance_uid": study.study_instance_uid,
        "sop_class_uid": instance.sop_class_uid,
        "created": result.created,
        "file_url": request.build_absolute_uri(reverse("api:instance-file", args=[instance.sop_instance_uid])),
        "wado_url": request.build_absolute_uri(wado),
    }


class AiResultsApi(ApiView):
    """POST /api/v1/instances/{sop_instance_uid}/ai-results/: the image's model outputs as
    DICOM SR (detections) and SEG (masks), stored and retrievable like any instance."""

    @extend_schema(
        operation_id="instances_ai_results",
        summary="Store the image's AI results as DICOM SR and SEG",
        description=(
            "Detections of the latest detector version become a DICOM SR measurement report (TID 1500), masks of"
            " the latest segmenter version a DICOM Segmentation; both are stored through ingest (so WADO-RS serves"
            " them) and generated once per (source instance, model version)."
        ),
        parameters=[OpenApiParameter("sop_instance_uid", str, OpenApiParameter.PATH, description="SOPInstanceUID")],
        request=AiResultsInput,
        responses={
            201: AiResultsOutput,
            200: OpenApiResponse(AiResultsOutput, description="All were stored before."),
            **error_responses(
                400, 404, 409, 422, _409="The image has no model results.", _422="They cannot be encoded."
            ),
        },
    )
    def post(self, request, sop_instance_uid: str):
        data = AiResultsInput(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            results = services.ai_results_store(sop_instance_uid=sop_instance_uid, kinds=data.validated_data["kinds"])
        except ExportError as exc:
            audit_export(
                request, kind="ai-dicom", target_type="instance", target=sop_instance_uid, outcome="error",
                reason=exc.reason,
            )  # fmt: skip
            return error_response(exc.reason, exc.http_status)
        audit_export(
            request,
            kind="ai-dicom",
            target_type="instance",
            target=sop_instance_uid,
            stored=[r.instance.sop_instance_uid for r in results],
        )
        payload = {
            "source_sop_instance_uid": sop_instance_uid,
            "results": [ai_result_payload(request, r) for r in results],
        }
        created = any(r.created for r in results)
        return Response(payload, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)
