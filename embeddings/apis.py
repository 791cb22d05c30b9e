"""POST /api/v1/search/ and search feedback."""

from __future__ import annotations

import numpy as np
from django.urls import reverse
from rest_framework import serializers, status
from rest_framework.parsers import JSONParser, MultiPartParser
from rest_framework.response import Response

from precedent.api import ApiView, error_response
from studies.models import Instance

from . import selectors, services
from .models import Embedding, EncoderVersion
from .selectors import MAX_K, SearchError, SearchFilters

PATHOLOGIES = ["normal", "benign", "malignant", "unknown"]


class SearchInput(serializers.Serializer):
    sop_instance_uid = serializers.CharField(required=False, max_length=64)
    box = serializers.ListField(child=serializers.FloatField(), min_length=4, max_length=4, required=False)
    file = serializers.FileField(required=False)
    vector = serializers.ListField(child=serializers.FloatField(), required=False, min_length=1, max_length=4096)
    encoder = serializers.CharField(required=False, max_length=100, help_text="encoder version (default: active)")
    k = serializers.IntegerField(required=False, default=10, min_value=1, max_value=MAX_K)
    kind = serializers.ChoiceField(choices=Embedding.Kind.values, required=False)
    modality = serializers.CharField(required=False, allow_blank=True, max_length=16)
    body_part = serializers.CharField(required=False, allow_blank=True, max_length=64)
    laterality = serializers.CharField(required=False, allow_blank=True, max_length=16)
    view_position = serializers.CharField(required=False, allow_blank=True, max_length=16)
    finding_class = serializers.CharField(required=False, allow_blank=True, max_length=64)
    pathology = serializers.ChoiceField(choices=PATHOLOGIES, required=False, allow_blank=True)
    date_from = serializers.DateField(required=False)
    date_to = serializers.DateField(required=False)
    cohort = serializers.CharField(required=False, allow_blank=True, max_length=100)
    exclude_same_patient = serializers.BooleanField(required=False, default=True)

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
        return selectors.similar_cases(image=picture.pixels, monochrome1=picture.monochrome1, **common)
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
    rank = serializers.IntegerField(min_value=1)
    score = serializers.FloatField()
    relevant = serializers.BooleanField()


class FeedbackApi(ApiView):
    """POST /api/v1/search/feedback/: a radiologist's verdict on one result."""

    def post(self, request):
        data = FeedbackInput(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            feedback = services.feedback_record(user=request.user, **data.validated_data)
        except Instance.DoesNotExist as exc:
            return error_response(str(exc), status.HTTP_404_NOT_FOUND)
        return Response({"id": feedback.pk, "relevant": feedback.relevant}, status=status.HTTP_201_CREATED)
