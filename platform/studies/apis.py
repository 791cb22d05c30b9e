"""REST API for studies and instances (Django REST framework, token or session auth).

Views validate with an input serializer, call one service or selector, and return.
"""

from __future__ import annotations

from django.http import FileResponse
from rest_framework import serializers, status
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.pagination import PageNumberPagination
from rest_framework.parsers import MultiPartParser
from rest_framework.response import Response

from precedent.api import ApiView, error_response

from . import selectors, services
from .dicom import PRESETS, Window, png_window
from .errors import RenderError
from .models import Finding, Instance, Series, Study
from .services import Outcome, RenderRequest

# --- serializers ---------------------------------------------------------------------


class FindingOutput(serializers.ModelSerializer):
    box = serializers.ListField(child=serializers.FloatField(), allow_null=True, read_only=True)

    class Meta:
        model = Finding
        fields = ["id", "pathology", "abnormality_class", "box", "source", "attributes"]


class InstanceOutput(serializers.ModelSerializer):
    transfer_syntax = serializers.CharField(source="transfer_syntax_name")
    sop_class = serializers.CharField(source="sop_class_name")
    findings = FindingOutput(many=True, read_only=True)
    preview_url = serializers.SerializerMethodField()
    thumbnail_url = serializers.SerializerMethodField()
    file_url = serializers.SerializerMethodField()

    class Meta:
        model = Instance
        fields = [
            "sop_instance_uid",
            "sop_class_uid",
            "sop_class",
            "instance_number",
            "laterality",
            "view_position",
            "rows",
            "columns",
            "number_of_frames",
            "samples_per_pixel",
            "bits_allocated",
            "bits_stored",
            "photometric_interpretation",
            "transfer_syntax_uid",
            "transfer_syntax",
            "has_pixel_data",
            "sha256",
            "size",
            "created_at",
            "findings",
            "preview_url",
            "thumbnail_url",
            "file_url",
        ]

    def _url(self, obj: Instance, name: str) -> str | None:
        from django.urls import reverse

        if name != "api:instance-file" and not obj.is_previewable:
            return None
        return reverse(name, args=[obj.sop_instance_uid])

    def get_preview_url(self, obj: Instance) -> str | None:
        return self._url(obj, "api:instance-preview")

    def get_thumbnail_url(self, obj: Instance) -> str | None:
        return self._url(obj, "api:instance-thumbnail")

    def get_file_url(self, obj: Instance) -> str | None:
        return self._url(obj, "api:instance-file")


class SeriesOutput(serializers.ModelSerializer):
    instances = InstanceOutput(many=True, read_only=True)

    class Meta:
        model = Series
        fields = [
            "series_instance_uid",
            "modality",
            "series_number",
            "description",
            "body_part",
            "manufacturer",
            "manufacturer_model",
            "instances",
        ]


class PatientOutput(serializers.Serializer):
    patient_id = serializers.CharField()
    issuer_of_patient_id = serializers.CharField()
    name = serializers.CharField()
    sex = serializers.CharField()
    birth_date = serializers.DateField()
    is_synthetic = serializers.BooleanField()


class StudySummaryOutput(serializers.ModelSerializer):
    patient = PatientOutput(read_only=True)
    instance_count = serializers.IntegerField(read_only=True)
    url = serializers.SerializerMethodField()

    class Meta:
        model = Study
        fields = [
            "study_instance_uid",
            "patient",
            "accession_number",
            "study_id",
            "study_date",
            "study_time",
            "description",
            "modalities",
            "referring_physician",
            "institution_name",
            "instance_count",
            "created_at",
            "url",
        ]

    def get_url(self, obj: Study) -> str:
        from django.urls import reverse

        return reverse("api:study-detail", args=[obj.study_instance_uid])


class StudyDetailOutput(StudySummaryOutput):
    series = SeriesOutput(many=True, read_only=True)
    cohorts = serializers.SlugRelatedField(many=True, read_only=True, slug_field="name")
    instance_count = None

    class Meta(StudySummaryOutput.Meta):
        fields = [f for f in StudySummaryOutput.Meta.fields if f != "instance_count"] + ["cohorts", "series"]


class StudyFilterInput(serializers.Serializer):
    q = serializers.CharField(required=False, allow_blank=True)
    patient_id = serializers.CharField(required=False, allow_blank=True)
    patient_name = serializers.CharField(required=False, allow_blank=True)
    accession = serializers.CharField(required=False, allow_blank=True)
    modality = serializers.CharField(required=False, allow_blank=True)
    date_from = serializers.DateField(required=False)
    date_to = serializers.DateField(required=False)
    cohort = serializers.CharField(required=False, allow_blank=True)
    sort = serializers.ChoiceField(choices=list(selectors.SORTS), required=False)

    def validate(self, attrs):
        if attrs.get("date_from") and attrs.get("date_to") and attrs["date_from"] > attrs["date_to"]:
            raise serializers.ValidationError("date_from is after date_to")
        return attrs


class RenderInput(serializers.Serializer):
    frame = serializers.IntegerField(required=False, min_value=1, default=1)
    preset = serializers.ChoiceField(choices=list(PRESETS), required=False, default="default")
    wc = serializers.FloatField(required=False)
    ww = serializers.FloatField(required=False, min_value=1)
    size = serializers.IntegerField(required=False, min_value=16, max_value=8192)

    def validate(self, attrs):
        if ("wc" in attrs) != ("ww" in attrs):
            raise serializers.ValidationError("wc and ww go together: give both or neither")
        return attrs


# --- views ---------------------------------------------------------------------------


class StudyPagination(PageNumberPagination):
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500


class StudyListApi(ApiView):
    """GET /api/v1/studies/: filters q, patient_id, patient_name, accession, modality,
    date_from, date_to (YYYY-MM-DD), cohort, sort; paginated with page and page_size."""

    def get(self, request):
        filters = StudyFilterInput(data=request.query_params)
        filters.is_valid(raise_exception=True)
        studies = selectors.study_list(**filters.validated_data)
        paginator = StudyPagination()
        page = paginator.paginate_queryset(studies, request, view=self)
        return paginator.get_paginated_response(StudySummaryOutput(page, many=True).data)


class StudyDetailApi(ApiView):
    """GET /api/v1/studies/{study_instance_uid}/ with its series, instances and findings."""

    def get(self, request, study_instance_uid: str):
        try:
            study = selectors.study_get(study_instance_uid=study_instance_uid)
        except Study.DoesNotExist:
            return error_response(f"no study with StudyInstanceUID {study_instance_uid}", status.HTTP_404_NOT_FOUND)
        return Response(StudyDetailOutput(study).data)


class InstanceUploadApi(ApiView):
    """POST /api/v1/instances/: multipart, one or more fields named `file`, or one
    DICOM file as an `application/dicom` body (name it with an X-Filename header).

    Answers one entry per file: 201 stored, 200 duplicate, 4xx rejected with a one-line
    `error`. The response is 201 when every file was stored or a duplicate (200 when all
    were duplicates), 202 when some were rejected, 400 when all were rejected, and 413
    before reading a body over PRECEDENT_MAX_UPLOAD_BYTES.
    """

    parser_classes = [MultiPartParser]

    def post(self, request):
        from django.conf import settings

        limit = settings.PRECEDENT_MAX_UPLOAD_BYTES
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > limit:
            return error_response(
                f"request of {length} bytes is over the upload limit of {limit} bytes",
                status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
            )
        if request.content_type.split(";")[0].strip().lower() == "application/dicom":
            # One Part 10 file as the whole body (as Orthanc's POST /instances takes
            # it): streamed into the store without multipart parsing or a second copy.
            if length == 0:
                return error_response("empty body: send a DICOM file", status.HTTP_400_BAD_REQUEST)
            results = [services.instance_ingest(source=request.stream, name=request.headers.get("X-Filename", ""))]
        else:
            files = request.FILES.getlist("file")
            if not files:
                return error_response(
                    "no files: send one or more multipart fields named 'file', or one application/dicom body",
                    status.HTTP_400_BAD_REQUEST,
                )
            results = [services.instance_ingest(source=upload, name=upload.name) for upload in files]
        counts = {outcome: sum(r.outcome == outcome for r in results) for outcome in Outcome}
        body = {
            "stored": counts[Outcome.STORED],
            "duplicates": counts[Outcome.DUPLICATE],
            "rejected": counts[Outcome.REJECTED],
            "results": [r.as_dict() for r in results],
        }
        if counts[Outcome.REJECTED] == len(results):
            body["error"] = results[0].reason if len(results) == 1 else f"all {len(results)} files were rejected"
            return Response(body, status=results[0].http_status if len(results) == 1 else 400)
        if counts[Outcome.REJECTED]:
            return Response(body, status=status.HTTP_202_ACCEPTED)
        if counts[Outcome.STORED] == 0:
            return Response(body, status=status.HTTP_200_OK)
        return Response(body, status=status.HTTP_201_CREATED)


class _AnyAccept(BaseContentNegotiation):
    """Image endpoints answer PNG, and JSON errors whatever <img> sent as Accept."""

    def select_parser(self, request, parsers):
        return parsers[0]

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


class _InstanceApi(ApiView):
    content_negotiation_class = _AnyAccept

    def instance_or_404(self, sop_instance_uid: str) -> Instance | Response:
        try:
            return selectors.instance_get(sop_instance_uid=sop_instance_uid)
        except Instance.DoesNotExist:
            return error_response(f"no instance with SOPInstanceUID {sop_instance_uid}", status.HTTP_404_NOT_FOUND)


class InstanceDetailApi(_InstanceApi):
    """GET /api/v1/instances/{sop_instance_uid}/: header values, findings, links."""

    def get(self, request, sop_instance_uid: str):
        instance = self.instance_or_404(sop_instance_uid)
        if isinstance(instance, Response):
            return instance
        data = InstanceOutput(instance).data
        series = instance.series
        data["series_instance_uid"] = series.series_instance_uid
        data["study_instance_uid"] = series.study.study_instance_uid
        data["modality"] = series.modality
        return Response(data)


class InstanceFileApi(_InstanceApi):
    """GET /api/v1/instances/{sop_instance_uid}/file: the stored DICOM file."""

    def get(self, request, sop_instance_uid: str):
        instance = self.instance_or_404(sop_instance_uid)
        if isinstance(instance, Response):
            return instance
        path = services.dicom_store().path(instance.file_path)
        return FileResponse(
            path.open("rb"), content_type="application/dicom", as_attachment=True, filename=f"{sop_instance_uid}.dcm"
        )


class InstancePreviewApi(_InstanceApi):
    """GET /api/v1/instances/{sop_instance_uid}/preview.png

    Query: frame (1-based), preset (default, auto, full, or a CT window such as lung),
    wc and ww (window centre and width, overriding the preset), size (longest side).
    The applied window comes back in X-Window-Center and X-Window-Width.
    """

    max_size: int | None = None

    def get(self, request, sop_instance_uid: str):
        instance = self.instance_or_404(sop_instance_uid)
        if isinstance(instance, Response):
            return instance
        params = RenderInput(data=request.query_params)
        params.is_valid(raise_exception=True)
        p = params.validated_data
        if not instance.is_previewable:
            return error_response(
                f"instance has no image pixel data ({instance.sop_class_name})", status.HTTP_422_UNPROCESSABLE_ENTITY
            )
        if p["frame"] > instance.number_of_frames:
            return error_response(
                f"frame {p['frame']} is out of range 1..{instance.number_of_frames}", status.HTTP_400_BAD_REQUEST
            )
        window = Window(p["wc"], p["ww"]) if "wc" in p else None
        render = RenderRequest(
            frame=p["frame"], preset=p["preset"], window=window, max_size=p.get("size") or self.max_size
        )
        try:
            png = services.instance_render_png(instance=instance, request=render)
        except RenderError as exc:
            return error_response(str(exc), status.HTTP_422_UNPROCESSABLE_ENTITY)
        response = FileResponse(png.open("rb"), content_type="image/png")
        response["Cache-Control"] = "private, max-age=86400"
        applied = png_window(png)
        if applied is not None:
            response["X-Window-Center"] = f"{applied.center:g}"
            response["X-Window-Width"] = f"{applied.width:g}"
        return response


class InstanceThumbnailApi(InstancePreviewApi):
    """GET /api/v1/instances/{sop_instance_uid}/thumbnail.png (256 px, default window)."""

    max_size = services.THUMBNAIL_SIZE
