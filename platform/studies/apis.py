"""REST API for studies and instances (Django REST framework, token or session auth).

Views validate with an input serializer, call one service or selector, and return.
"""

from __future__ import annotations

from django.http import FileResponse, JsonResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.pagination import PageNumberPagination
from rest_framework.parsers import MultiPartParser
from rest_framework.response import Response

from precedent.api import ApiView, BinaryFileField, ErrorOutput, body_over_limit, error_response, error_responses

from . import selectors, services, uploads
from .dicom import PRESETS, Window, png_window
from .errors import RenderError
from .models import Finding, Instance, Series, Study
from .services import Outcome, RenderRequest

# --- serializers ---------------------------------------------------------------------


@extend_schema_field(
    {"type": "string", "pattern": r"^\d{2}:\d{2}:\d{2}(\.\d{1,6})?$", "example": "07:27:30", "nullable": True}
)
class LocalTimeField(serializers.TimeField):
    """DICOM times are local, without a UTC offset: documented as HH:MM:SS[.ffffff], not
    as OpenAPI's `format: time` (RFC 3339, which requires an offset)."""


class FindingOutput(serializers.ModelSerializer):
    box = serializers.ListField(child=serializers.FloatField(), allow_null=True, read_only=True)

    class Meta:
        model = Finding
        fields = ["id", "pathology", "abnormality_class", "box", "source", "attributes"]
        read_only_fields = fields  # output only: the schema marks every field as always present


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
        read_only_fields = fields

    def _url(self, obj: Instance, name: str) -> str | None:
        from django.urls import reverse

        if name != "api:instance-file" and not obj.is_previewable:
            return None
        return reverse(name, args=[obj.sop_instance_uid])

    def get_preview_url(self, obj: Instance) -> str | None:
        return self._url(obj, "api:instance-preview")

    def get_thumbnail_url(self, obj: Instance) -> str | None:
        return self._url(obj, "api:instance-thumbnail")

    @extend_schema_field(OpenApiTypes.STR)  # never null: every instance has its file
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
        read_only_fields = fields


class PatientOutput(serializers.Serializer):
    """The patient as a study names them: the ID groups studies; name, sex and birth
    date are the study's own (they can differ between studies under one ID)."""

    patient_id = serializers.CharField(source="patient.patient_id")
    issuer_of_patient_id = serializers.CharField(source="patient.issuer_of_patient_id")
    name = serializers.CharField(source="patient_name", help_text="DICOM PN, e.g. 'Family^Given'")
    sex = serializers.CharField(source="patient_sex")
    birth_date = serializers.DateField(source="patient_birth_date", allow_null=True)
    is_synthetic = serializers.BooleanField(source="patient.is_synthetic")


class InstanceDetailOutput(InstanceOutput):
    series_instance_uid = serializers.CharField(source="series.series_instance_uid")
    study_instance_uid = serializers.CharField(source="series.study.study_instance_uid")
    modality = serializers.CharField(source="series.modality")

    class Meta(InstanceOutput.Meta):
        fields = InstanceOutput.Meta.fields + ["series_instance_uid", "study_instance_uid", "modality"]
        read_only_fields = fields


class UploadResultOutput(serializers.Serializer):
    """One file's outcome (services.IngestResult.as_dict)."""

    file = serializers.CharField(help_text="The file's name as sent (multipart filename or X-Filename).")
    status = serializers.IntegerField(help_text="HTTP status for this file: 201 stored, 200 duplicate, 4xx rejected.")
    outcome = serializers.ChoiceField(choices=[o.value for o in Outcome])
    sop_instance_uid = serializers.CharField(required=False, help_text="Stored or duplicate files only.")
    series_instance_uid = serializers.CharField(required=False, help_text="Stored or duplicate files only.")
    study_instance_uid = serializers.CharField(required=False, help_text="Stored or duplicate files only.")
    error = serializers.CharField(required=False, help_text="Rejected files only: why, in one line.")


class UploadOutput(serializers.Serializer):
    stored = serializers.IntegerField()
    duplicates = serializers.IntegerField()
    rejected = serializers.IntegerField()
    results = UploadResultOutput(many=True)


class UploadErrorOutput(ErrorOutput):
    """An upload refused whole: the error, with the per-file report when files were read."""

    stored = serializers.IntegerField(required=False)
    duplicates = serializers.IntegerField(required=False)
    rejected = serializers.IntegerField(required=False)
    results = UploadResultOutput(many=True, required=False)


class UploadInput(serializers.Serializer):
    """multipart/form-data: one or more parts named `file` (documentation only)."""

    file = serializers.ListField(child=BinaryFileField(), min_length=1, help_text="DICOM Part 10 files.")


class StudySummaryOutput(serializers.ModelSerializer):
    patient = PatientOutput(source="*", read_only=True)
    study_time = LocalTimeField(read_only=True, allow_null=True)
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
        read_only_fields = fields

    def get_url(self, obj: Study) -> str:
        from django.urls import reverse

        return reverse("api:study-detail", args=[obj.study_instance_uid])


class StudyDetailOutput(StudySummaryOutput):
    series = SeriesOutput(many=True, read_only=True)
    cohorts = serializers.SlugRelatedField(many=True, read_only=True, slug_field="name")
    instance_count = None

    class Meta(StudySummaryOutput.Meta):
        fields = [f for f in StudySummaryOutput.Meta.fields if f != "instance_count"] + ["cohorts", "series"]
        read_only_fields = fields


class StudyFilterInput(serializers.Serializer):
    q = serializers.CharField(
        required=False, allow_blank=True, help_text="Free text: patient name or ID, accession, description."
    )
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
    frame = serializers.IntegerField(required=False, min_value=1, default=1, help_text="1-based frame number.")
    preset = serializers.ChoiceField(choices=list(PRESETS), required=False, default="default")
    # Stored values are at most 32-bit; beyond ±1e9 a window is a typo (and overflows float32).
    wc = serializers.FloatField(
        required=False, min_value=-1e9, max_value=1e9, help_text="Window centre (give ww too); overrides the preset."
    )
    ww = serializers.FloatField(required=False, min_value=1, max_value=1e9, help_text="Window width (give wc too).")
    size = serializers.IntegerField(
        required=False, min_value=16, max_value=8192, help_text="Longest side of the image in pixels."
    )

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

    pagination_class = StudyPagination

    @extend_schema(
        operation_id="studies_list",
        summary="List studies",
        parameters=[StudyFilterInput],
        responses={
            200: StudySummaryOutput(many=True),
            **error_responses(400, 404, _404="A page past the last one."),
        },
    )
    def get(self, request):
        filters = StudyFilterInput(data=request.query_params)
        filters.is_valid(raise_exception=True)
        studies = selectors.study_list(**filters.validated_data)
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(studies, request, view=self)
        return paginator.get_paginated_response(StudySummaryOutput(page, many=True).data)


class StudyDetailApi(ApiView):
    """GET /api/v1/studies/{study_instance_uid}/ with its series, instances and findings."""

    @extend_schema(
        operation_id="studies_retrieve",
        summary="One study with its series, instances and findings",
        parameters=[OpenApiParameter("study_instance_uid", str, OpenApiParameter.PATH, description="StudyInstanceUID")],
        responses={200: StudyDetailOutput, **error_responses(404)},
    )
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

    def dispatch(self, request, *args, **kwargs):
        # Nothing reads the body of a request that is too large, or of a browser session
        # whose user may not ingest: DRF's CSRF check for sessions (below) reads the form,
        # and with it every file, before its permission check would refuse. (An API
        # token is read later, by DRF, before anything reads the body.)
        too_large = body_over_limit(request)
        if too_large:
            return JsonResponse({"error": too_large}, status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
        session_user = getattr(request, "user", None)
        if session_user is not None and session_user.is_authenticated:
            from access.enforce import check_request

            decision = check_request(request, user=session_user)
            if not decision.allowed:
                return JsonResponse({"error": decision.reason}, status=decision.status)
        # A multipart body's files are spooled into the store as it is parsed, written
        # once (uploads.py). Set up before DRF authenticates: a browser session's CSRF
        # check reads the form. What the ingest did not take is removed at the end,
        # also when the request is refused or its body breaks off.
        self.spooler = uploads.spool_uploads(request)
        try:
            return super().dispatch(request, *args, **kwargs)
        finally:
            if self.spooler is not None:
                self.spooler.discard()

    @extend_schema(
        operation_id="instances_create",
        summary="Store DICOM files",
        request={"multipart/form-data": UploadInput, "application/dicom": OpenApiTypes.BINARY},
        parameters=[
            OpenApiParameter(
                "X-Filename",
                str,
                OpenApiParameter.HEADER,
                description="With an application/dicom body: the file's name, echoed in `results[].file`.",
            )
        ],
        responses={
            201: OpenApiResponse(
                UploadOutput, description="Every file was stored or a duplicate, and at least one was stored."
            ),
            200: OpenApiResponse(UploadOutput, description="Every file was a duplicate of a stored one."),
            202: OpenApiResponse(UploadOutput, description="Some files were rejected: see `results`."),
            **error_responses(
                400,
                409,
                411,
                413,
                415,
                schema=UploadErrorOutput,
                _400="No file, a malformed body, or every file rejected (one file: its own status).",
                _409="The one file sent has other bytes under a stored SOPInstanceUID.",
                _411="An application/dicom body sent chunked, without a Content-Length.",
                _413="The request, or the one file sent, is over PRECEDENT_MAX_UPLOAD_BYTES.",
                _415="Neither multipart/form-data nor application/dicom, or the one file sent has pixel data "
                "in a transfer syntax no installed decoder reads.",
            ),
        },
    )
    def post(self, request):
        if request.content_type.split(";")[0].strip().lower() == "application/dicom":
            # One Part 10 file as the whole body (as Orthanc's POST /instances takes
            # it): streamed into the store without multipart parsing or a second copy.
            if request.META.get("CONTENT_LENGTH") in (None, "", "0"):
                if "chunked" in request.META.get("HTTP_TRANSFER_ENCODING", "").lower():
                    # WSGI hands Django no body without a length: say so, not "empty".
                    return error_response(
                        "a chunked body cannot be read here: send the file with a Content-Length",
                        status.HTTP_411_LENGTH_REQUIRED,
                    )
                return error_response("empty body: send a DICOM file", status.HTTP_400_BAD_REQUEST)
            results = [services.instance_ingest(source=request.stream, name=request.headers.get("X-Filename", ""))]
        else:
            files = request.FILES.getlist("file")
            if not files:
                return error_response(
                    "no files: send one or more multipart fields named 'file', or one application/dicom body",
                    status.HTTP_400_BAD_REQUEST,
                )
            # One transaction per batch of files (services.INGEST_BATCH), not per file.
            results = services.instances_ingest((uploads.ingest_source(f), f.name) for f in files)
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


SOP_INSTANCE_UID = OpenApiParameter("sop_instance_uid", str, OpenApiParameter.PATH, description="SOPInstanceUID")


def render_schema(*, operation_id: str, summary: str):
    """The schema of the PNG endpoints (thumbnail.png differs only in its default size)."""
    return extend_schema(
        operation_id=operation_id,
        summary=summary,
        parameters=[
            SOP_INSTANCE_UID,
            RenderInput,
            OpenApiParameter("X-Window-Center", float, OpenApiParameter.HEADER, response=[200]),
            OpenApiParameter("X-Window-Width", float, OpenApiParameter.HEADER, response=[200]),
        ],
        responses={
            (200, "image/png"): OpenApiResponse(
                OpenApiTypes.BINARY, description="PNG; the window applied is in X-Window-Center and X-Window-Width."
            ),
            **{
                (code, "application/json"): response
                for code, response in error_responses(
                    400, 404, 422, _422="No image pixel data, or pixel data that cannot be decoded."
                ).items()
            },
        },
    )


class InstanceDetailApi(_InstanceApi):
    """GET /api/v1/instances/{sop_instance_uid}/: header values, findings, links."""

    @extend_schema(
        operation_id="instances_retrieve",
        summary="One instance: header values, findings, links",
        parameters=[SOP_INSTANCE_UID],
        responses={200: InstanceDetailOutput, **error_responses(404)},
    )
    def get(self, request, sop_instance_uid: str):
        instance = self.instance_or_404(sop_instance_uid)
        if isinstance(instance, Response):
            return instance
        return Response(InstanceDetailOutput(instance).data)


class InstanceFileApi(_InstanceApi):
    """GET /api/v1/instances/{sop_instance_uid}/file: the stored DICOM file."""

    @extend_schema(
        operation_id="instances_file",
        summary="Download the stored DICOM file",
        parameters=[SOP_INSTANCE_UID],
        responses={
            (200, "application/dicom"): OpenApiResponse(OpenApiTypes.BINARY, description="The DICOM Part 10 file."),
            **{(code, "application/json"): response for code, response in error_responses(404).items()},
        },
    )
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
    size_cap: int | None = None  # the largest `size` served (None: what RenderInput allows)

    @render_schema(operation_id="instances_preview", summary="The instance rendered as PNG")
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
        size = p.get("size") or self.max_size
        if self.size_cap is not None:
            size = min(size, self.size_cap)
        render = RenderRequest(frame=p["frame"], preset=p["preset"], window=window, max_size=size)
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
    """GET /api/v1/instances/{sop_instance_uid}/thumbnail.png (256 px, default window).

    Never larger than 256 px, whatever `size` asks: thumbnails are not audited (a grid
    of results asks for dozens), so a full-size image must come through preview.png,
    which is."""

    max_size = services.THUMBNAIL_SIZE
    size_cap = services.THUMBNAIL_SIZE

    @render_schema(operation_id="instances_thumbnail", summary="The instance as a PNG thumbnail (256 px by default)")
    def get(self, request, sop_instance_uid: str):
        return super().get(request, sop_instance_uid)
