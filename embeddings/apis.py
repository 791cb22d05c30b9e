"""POST /api/v1/search/ and search feedback."""

from __future__ import annotations

import numpy as np
from django.urls import reverse
from drf_spectacular.utils import OpenApiResponse, PolymorphicProxySerializer, extend_schema
from rest_framework import serializers, status
from rest_framework.parsers import JSONParser, MultiPartParser
from rest_framework.response import Response

from precedent.api import ApiView, BinaryFileField, error_response, error_responses
from studies.models import Finding, Instance

from . import selectors, services
from .models import Embedding, EncoderVersion
from .selectors import MAX_K, SearchError, SearchFilters

PATHOLOGIES = ["normal", "benign", "malignant", "unknown"]
# Query vectors become float32: a larger value would turn into infinity.
FLOAT32_MAX = float(np.finfo(np.float32).max)


class SearchInput(serializers.Serializer):
    sop_instance_uid = serializers.CharField(required=False, max_length=64)
    box = serializers.ListField(child=serializers.FloatField(), min_length=4, max_length=4, required=False)
    file = serializers.FileField(required=False)
    vector = serializers.ListField(
        child=serializers.FloatField(min_value=-FLOAT32_MAX, max_value=FLOAT32_MAX),
        required=False,
        min_length=1,
        max_length=4096,
    )
    encoder = serializers.CharField(required=False, max_length=100, help_text="encoder version (default: active)")
    k = serializers.IntegerField(required=False, default=10, min_value=1, max_value=MAX_K)
    kind = serializers.ChoiceField(choices=Embedding.Kind.choices, required=False)
    modality = serializers.CharField(required=False, allow_blank=True, max_length=16)
    body_part = serializers.CharField(required=False, allow_blank=True, max_length=64)
    laterality = serializers.CharField(required=False, allow_blank=True, max_length=16)
    view_position = serializers.CharField(required=False, allow_blank=True, max_length=16)
    finding_class = serializers.CharField(required=False, allow_blank=True, max_length=64)
    pathology = serializers.ChoiceField(choices=PATHOLOGIES, required=False, allow_blank=True)
    date_from = serializers.DateField(required=False)
    date_to = serializers.DateField(required=False)
    cohort = serializers.CharField(required=False, allow_blank=True, max_length=100)
    exclude_same_patient = serializers.BooleanField(
        required=False,
        default=True,
        help_text="Leave out the query patient's images: a stored query's patient, or an uploaded DICOM's "
        "PatientID and issuer.",
    )

    def validate(self, attrs):
        given = [name for name in ("sop_instance_uid", "file", "vector") if attrs.get(name)]
        if len(given) != 1:
            raise serializers.ValidationError("give one of sop_instance_uid, file or vector to search with")
        if attrs.get("encoder"):
            try:
                attrs["encoder"] = EncoderVersion.objects.get(name=attrs["encoder"])
            except EncoderVersion.DoesNotExist:
                raise serializers.ValidationError(f"no encoder version named {attrs['encoder']!r}") from None
        return attrs

    def filters(self) -> SearchFilters:
        data = self.validated_data
        names = SearchFilters.__dataclass_fields__
        return SearchFilters(**{name: data[name] for name in names if name in data})


# --- OpenAPI: the three forms of a search request and the response --------------------
# SearchInput validates every form; these only describe them, and a test keeps their
# fields in step with SearchInput's.


class _SearchOptions(serializers.Serializer):
    encoder = serializers.CharField(required=False, max_length=100, help_text="encoder version (default: active)")
    k = serializers.IntegerField(required=False, default=10, min_value=1, max_value=MAX_K)
    kind = serializers.ChoiceField(
        choices=Embedding.Kind.choices,
        required=False,
        help_text="What to search: whole images, or lesion regions (default: region with a box, else image).",
    )
    modality = serializers.CharField(required=False, allow_blank=True, max_length=16)
    body_part = serializers.CharField(required=False, allow_blank=True, max_length=64)
    laterality = serializers.CharField(required=False, allow_blank=True, max_length=16)
    view_position = serializers.CharField(required=False, allow_blank=True, max_length=16)
    finding_class = serializers.CharField(required=False, allow_blank=True, max_length=64)
    pathology = serializers.ChoiceField(choices=Finding.Pathology.choices, required=False, allow_blank=True)
    date_from = serializers.DateField(required=False)
    date_to = serializers.DateField(required=False)
    cohort = serializers.CharField(required=False, allow_blank=True, max_length=100)
    exclude_same_patient = serializers.BooleanField(
        required=False,
        default=True,
        help_text="Leave out the query patient's images: a stored query's patient, or an uploaded DICOM's "
        "PatientID and issuer.",
    )


_BOX_HELP = "A region [x0, y0, x1, y1] in image pixels (top-left origin) to search with, instead of the whole image."


class SearchByInstanceInput(_SearchOptions):
    sop_instance_uid = serializers.CharField(max_length=64, help_text="A stored instance to search with.")
    box = serializers.ListField(
        child=serializers.FloatField(), min_length=4, max_length=4, required=False, help_text=_BOX_HELP
    )


class SearchByVectorInput(_SearchOptions):
    vector = serializers.ListField(
        child=serializers.FloatField(min_value=-FLOAT32_MAX, max_value=FLOAT32_MAX),
        min_length=1,
        max_length=4096,
        help_text="A query vector made by the same encoder (as many values as its dimension).",
    )


class SearchByFileInput(_SearchOptions):
    file = BinaryFileField(help_text="A DICOM, PNG or JPEG image to search with.")
    box = serializers.ListField(
        child=serializers.FloatField(), min_length=4, max_length=4, required=False, help_text=_BOX_HELP
    )


class FindingSummaryOutput(serializers.Serializer):
    pathology = serializers.CharField()
    abnormality_class = serializers.CharField()


class FindingWithBoxOutput(FindingSummaryOutput):
    box = serializers.ListField(child=serializers.FloatField(), allow_null=True)


class SearchHitOutput(serializers.Serializer):
    rank = serializers.IntegerField()
    embedding_id = serializers.IntegerField()
    score = serializers.FloatField()
    kind = serializers.ChoiceField(choices=Embedding.Kind.choices)
    sop_instance_uid = serializers.CharField()
    series_instance_uid = serializers.CharField()
    study_instance_uid = serializers.CharField()
    patient_id = serializers.CharField()
    modality = serializers.CharField()
    laterality = serializers.CharField()
    view_position = serializers.CharField()
    study_date = serializers.DateField(allow_null=True)
    box = serializers.ListField(
        child=serializers.FloatField(), allow_null=True, help_text="The region found (region hits only)."
    )
    finding = FindingSummaryOutput(allow_null=True, help_text="The lesion a region hit is.")
    findings = FindingWithBoxOutput(many=True, help_text="Every finding of the image found.")
    thumbnail_url = serializers.CharField()
    study_url = serializers.CharField()


class SearchQueryOutput(serializers.Serializer):
    sop_instance_uid = serializers.CharField(allow_null=True)
    box = serializers.ListField(child=serializers.FloatField(), allow_null=True)


class SearchResultsOutput(serializers.Serializer):
    status = serializers.ChoiceField(
        choices=["ok", "no_encoder", "no_index", "empty_index", "index_loading", "encoder_unavailable"],
        help_text=(
            "ok, or why there are no results: no active encoder, nothing indexed yet, the index still loading "
            "(ask again in a moment), or the active encoder's "
            "weights file cannot be loaded to embed the query (an administrator's problem; message says which)."
        ),
    )
    message = serializers.CharField()
    encoder = serializers.CharField(help_text="The encoder version searched (empty with no_encoder).")
    kind = serializers.ChoiceField(choices=Embedding.Kind.choices)
    k = serializers.IntegerField()
    query = SearchQueryOutput()
    results = SearchHitOutput(many=True)


class FeedbackOutput(serializers.Serializer):
    id = serializers.IntegerField()
    relevant = serializers.BooleanField()


def result_dict(hit: selectors.Hit) -> dict:
    return {
        "rank": hit.rank,
        "embedding_id": hit.embedding_id,
        "score": round(hit.score, 6),
        "kind": hit.kind,
        "sop_instance_uid": hit.sop_instance_uid,
        "series_instance_uid": hit.series_instance_uid,
        "study_instance_uid": hit.study_instance_uid,
        "patient_id": hit.patient_id,
        "modality": hit.modality,
        "laterality": hit.laterality,
        "view_position": hit.view_position,
        "study_date": hit.study_date,
        "box": hit.box,
        "finding": hit.finding,
        "findings": hit.findings,
        "thumbnail_url": reverse("api:instance-thumbnail", args=[hit.sop_instance_uid]),
        "study_url": reverse("studies:detail", args=[hit.study_instance_uid]),
    }


def results_dict(results: selectors.SearchResults) -> dict:
    return {
        "status": results.status,
        "message": results.message,
        "encoder": results.encoder,
        "kind": results.kind,
        "k": results.k,
        "query": results.query,
        "results": [result_dict(hit) for hit in results.hits],
    }


def run_search(data: SearchInput) -> selectors.SearchResults:
    """Shared by the API and the search page. Raises Instance.DoesNotExist, SearchError."""
    params = data.validated_data
    box = tuple(params["box"]) if "box" in params else None
    common = dict(
        k=params["k"], filters=data.filters(), kind=params.get("kind"), box=box, encoder=params.get("encoder")
    )
    if params.get("vector"):
        return selectors.similar_cases(vector=np.asarray(params["vector"], dtype=np.float32), **common)
    if params.get("file") is not None:
        picture = services.picture_from_upload(params["file"])
        return selectors.similar_cases(
            image=picture.pixels, monochrome1=picture.monochrome1, patient=picture.patient, **common
        )
    instance = Instance.objects.select_related("series__study").get(sop_instance_uid=params["sop_instance_uid"])
    return selectors.similar_cases(instance=instance, **common)


class SearchApi(ApiView):
    """POST /api/v1/search/: JSON {"sop_instance_uid", "box"?, "k"?, filters...}, or
    multipart with a `file` (DICOM, PNG or JPEG) as the query, or JSON {"vector": [...]}
    embedded with the same encoder (`encoder`: a version name, default the active one).

    200 with results, or with `status` saying why there are none (no active encoder,
    empty index); 404 for an unknown UID; 400 for a bad box, k or upload.
    """

    parser_classes = [JSONParser, MultiPartParser]

    @extend_schema(
        operation_id="search_create",
        summary="Find similar images or lesions",
        request={
            "application/json": PolymorphicProxySerializer(
                component_name="SearchRequest",
                serializers=[SearchByInstanceInput, SearchByVectorInput],
                resource_type_field_name=None,
            ),
            "multipart/form-data": SearchByFileInput,
        },
        responses={
            200: OpenApiResponse(
                SearchResultsOutput, description="Results, or an empty list with `status` saying why."
            ),
            **error_responses(
                400,
                404,
                415,
                _400="Invalid input: not exactly one of sop_instance_uid, file or vector; a bad box, k, "
                "encoder or vector length; an upload that cannot be decoded.",
                _404="No instance with that sop_instance_uid.",
                _415="Neither application/json nor multipart/form-data.",
            ),
        },
    )
    def post(self, request):
        data = SearchInput(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            results = run_search(data)
        except Instance.DoesNotExist:
            uid = data.validated_data["sop_instance_uid"]
            return error_response(f"no instance with SOPInstanceUID {uid}", status.HTTP_404_NOT_FOUND)
        except SearchError as exc:
            return error_response(str(exc), status.HTTP_400_BAD_REQUEST)
        return Response(results_dict(results))


class FeedbackInput(serializers.Serializer):
    query_sop_instance_uid = serializers.CharField(required=False, allow_blank=True, max_length=64)
    query_box = serializers.ListField(child=serializers.FloatField(), min_length=4, max_length=4, required=False)
    result_sop_instance_uid = serializers.CharField(max_length=64)
    result_box = serializers.ListField(
        child=serializers.FloatField(), min_length=4, max_length=4, required=False, allow_null=True
    )
    rank = serializers.IntegerField(min_value=1, max_value=2**31 - 1)  # the column is a PostgreSQL integer
    score = serializers.FloatField()
    relevant = serializers.BooleanField()


class FeedbackApi(ApiView):
    """POST /api/v1/search/feedback/: a radiologist's verdict on one result."""

    @extend_schema(
        operation_id="search_feedback_create",
        summary="Record whether a search result was relevant",
        request=FeedbackInput,
        responses={201: FeedbackOutput, **error_responses(400, 404, 415, _404="An instance named is not stored.")},
    )
    def post(self, request):
        data = FeedbackInput(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            feedback = services.feedback_record(user=request.user, **data.validated_data)
        except Instance.DoesNotExist as exc:
            return error_response(str(exc), status.HTTP_404_NOT_FOUND)
        return Response({"id": feedback.pk, "relevant": feedback.relevant}, status=status.HTTP_201_CREATED)
