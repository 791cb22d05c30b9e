"""Search pages (htmx): similar prior cases for a stored image, a box on it, or an upload.

Thin views over the same input checks and search as the API (`apis.SearchInput`,
`apis.run_search`, `apis.result_dict`): they turn the query string (or the upload
form) into the API's input, run it and render. htmx requests aimed at the results get
only the results partial, with the canonical URL pushed, so every state of the page
can be shared and reloaded. Bad input is shown in the page with a 400 or 404; a search
that cannot run yet (no encoder, empty index) says why with a 200, as the API does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, QueryDict
from django.shortcuts import render
from django.urls import reverse
from django.utils.cache import patch_vary_headers
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_http_methods, require_POST, require_safe
from django_htmx.http import push_url

from studies import selectors as study_selectors
from studies.dicom import presets_for
from studies.models import Instance
from studies.views import VIEWER_IMAGE_SIZE, overlay_boxes

from . import selectors, services
from .apis import PATHOLOGIES, FeedbackInput, SearchInput, result_dict, run_search
from .models import Embedding
from .selectors import SearchError, SearchResults

RESULTS_TARGET = "search-results"
COMPARE_TARGET = "compare-slot"
DEFAULT_K = 10
FILTERS = selectors.SearchFilters.NARROWING
# How the API's field names read in an error message on the page.
LABELS = {
    "sop_instance_uid": "Query image",
    "box": "Box",
    "file": "Upload",
    "k": "Number of results",
    "kind": "Search in",
    "body_part": "Body part",
    "view_position": "View",
    "finding_class": "Finding class",
    "date_from": "From",
    "date_to": "To",
}
LATERALITY_NAMES = {"L": "Left", "R": "Right", "B": "Both", "U": "Unpaired"}


class BadInput(ValueError):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# --- turning the page's parameters into the API's input -----------------------------------


def parse_box(value: str, name: str = "box") -> list[float] | None:
    """ "x0,y0,x1,y1" in image pixels (the URL form), or None when empty."""
    if not value.strip():
        return None
    try:
        box = [float(part) for part in value.split(",")]
    except ValueError:
        box = []
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise BadInput(f"{name} must be four numbers x0,y0,x1,y1 in image pixels, not {value!r}")
    return box


def format_box(box: list[float] | tuple[float, ...] | None) -> str:
    return ",".join(f"{v:g}" for v in box) if box else ""


def search_data(params: QueryDict, upload=None) -> dict[str, Any]:
    """SearchInput's data from the page's parameters; empty fields are left out."""
    data: dict[str, Any] = {}
    for name in (*FILTERS, "k", "kind"):
        value = params.get(name, "").strip()
        if value:
            data[name] = value
    # The checkbox rides on a hidden "0" before it: the last value wins, none means the default.
    exclude = params.getlist("exclude_same_patient")
    if exclude:
        data["exclude_same_patient"] = exclude[-1]
    if upload is not None:
        data["file"] = upload  # an upload replaces the image query (the page cannot box an upload)
        return data
    uid = params.get("sop_instance_uid", "").strip()
    if uid:
        data["sop_instance_uid"] = uid
    box = parse_box(params.get("box", ""))
    if box is not None:
        data["box"] = box
    return data


def error_message(errors: dict[str, Any]) -> str:
    """DRF's errors as one line a reader understands."""
    parts = []
    for name, messages in errors.items():
        if isinstance(messages, dict):  # a list field's errors, keyed by position
            messages = [m for value in messages.values() for m in value]
        text = " ".join(str(m) for m in messages)
        parts.append(text if name == "non_field_errors" else f"{LABELS.get(name, name.capitalize())}: {text}")
    return "; ".join(parts)


def default_kind(box) -> str:
    return Embedding.Kind.REGION if box else Embedding.Kind.IMAGE


def canonical_query(data: dict[str, Any]) -> QueryDict:
    """The shortest query string for validated input: defaults are left out."""
    query = QueryDict(mutable=True)
    if data.get("sop_instance_uid"):
        query["sop_instance_uid"] = data["sop_instance_uid"]
    if data.get("box"):
        query["box"] = format_box(data["box"])
    for name in FILTERS:
        value = data.get(name)
        if value:
            query[name] = value.isoformat() if hasattr(value, "isoformat") else value
    if data.get("k", DEFAULT_K) != DEFAULT_K:
        query["k"] = str(data["k"])
    if data.get("kind") and data["kind"] != default_kind(data.get("box")):
        query["kind"] = data["kind"]
    if not data.get("exclude_same_patient", True):
        query["exclude_same_patient"] = "0"
    return query


# --- what the page shows ---------------------------------------------------------------------


def filter_choices() -> dict[str, list[tuple[str, str]]]:
    """Menu entries for the sidebar: the values the archive holds."""
    values = selectors.search_filter_values()
    return {
        "modality": [(m, m) for m in values["modality"]],
        "body_part": [(b, b) for b in values["body_part"]],
        "laterality": [
            (v, f"{LATERALITY_NAMES[v]} ({v})" if v in LATERALITY_NAMES else v) for v in values["laterality"]
        ],
        "view_position": [(v, v) for v in values["view_position"]],
        "finding_class": [(c, c) for c in values["finding_class"]],
        "pathology": [(p, p.capitalize()) for p in PATHOLOGIES],
        "cohort": [(c, c) for c in values["cohort"]],
    }


def with_current(choices: dict[str, list[tuple[str, str]]], values: dict[str, str]) -> dict[str, list]:
    """A value from a shared URL stays selectable even when the archive no longer has it."""
    out = {}
    for name, options in choices.items():
        current = values.get(name, "")
        if current and current not in {value for value, _ in options}:
            options = [*options, (current, current)]
        out[name] = options
    return out


def form_values(params: QueryDict, kind: str) -> dict[str, Any]:
    """What the sidebar shows: the request's own values, defaults where none."""
    values: dict[str, Any] = {name: params.get(name, "").strip() for name in FILTERS}
    values["k"] = params.get("k", "").strip() or str(DEFAULT_K)
    exclude = params.getlist("exclude_same_patient")
    values["exclude_same_patient"] = (exclude[-1].lower() not in ("0", "false", "off", "no", "")) if exclude else True
    values["kind"] = kind
    return values


@dataclass
class Card:
    """One result in the grid, with what its thumbnail overlay and links need."""

    result: dict[str, Any]  # apis.result_dict: the same fields the API returns
    rows: int
    columns: int
    region: dict[str, float] | None  # the hit's box as x, y, width, height
    boxes: list[dict[str, Any]]  # ground-truth boxes of the image (for image hits)
    compare_url: str
    feedback: dict[str, Any]
    saved: str | None = None  # the reader's earlier verdict on it: "relevant" / "not-relevant"


def svg_box(box) -> dict[str, float]:
    x0, y0, x1, y1 = box
    return {"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0}


def feedback_values(query_uid: str, query_box, result: dict[str, Any]) -> dict[str, Any]:
    return {
        "key": f"{result['rank']}-{result['sop_instance_uid']}-{format_box(result['box'])}",
        "query_sop_instance_uid": query_uid,
        "query_box": format_box(query_box),
        "result_sop_instance_uid": result["sop_instance_uid"],
        "result_box": format_box(result["box"]),
        "rank": result["rank"],
        "score": result["score"],
    }


def compare_url(query_uid: str, query_box, result: dict[str, Any]) -> str:
    query = QueryDict(mutable=True)
    if query_uid:
        query["query"] = query_uid
    if query_box:
        query["qbox"] = format_box(query_box)
    query["result"] = result["sop_instance_uid"]
    if result["box"]:
        query["rbox"] = format_box(result["box"])
    query["rank"] = str(result["rank"])
    query["score"] = f"{result['score']:.6g}"
    return f"{reverse('search:compare')}?{query.urlencode()}"


def cards(results: SearchResults, query_uid: str, query_box, user=None) -> list[Card]:
    given = selectors.feedback_given(
        user=user, query_uid=query_uid, query_box=query_box, result_uids=[h.sop_instance_uid for h in results.hits]
    )
    out = []
    for hit in results.hits:
        result = result_dict(hit)
        boxes = [
            {**svg_box(f["box"]), "pathology": f["pathology"]} for f in result["findings"] if f["box"] and not hit.box
        ]
        out.append(
            Card(
                result=result,
                rows=hit.rows or 0,
                columns=hit.columns or 0,
                region=svg_box(hit.box) if hit.box else None,
                boxes=boxes,
                compare_url=compare_url(query_uid, query_box, result),
                feedback=feedback_values(query_uid, query_box, result),
                saved=given.get((hit.sop_instance_uid, selectors.box_key(hit.box))),
            )
        )
    return out


# --- pages -----------------------------------------------------------------------------------


@require_http_methods(["GET", "HEAD", "POST"])
def search(request: HttpRequest) -> HttpResponse:
    """GET: search with a stored image (`sop_instance_uid`, optional `box`) and filters.
    POST (multipart): search with an uploaded DICOM, PNG or JPEG and the same filters."""
    params = request.POST if request.method == "POST" else request.GET
    upload = request.FILES.get("file") if request.method == "POST" else None
    status = 200
    error = ""
    results: SearchResults | None = None
    data: dict[str, Any] = {}
    validated: dict[str, Any] = {}
    query_instance: Instance | None = None
    try:
        data = search_data(params, upload)
        if request.method == "POST" and upload is None:
            raise BadInput("choose a DICOM, PNG or JPEG file to search with")
        if "file" in data or "sop_instance_uid" in data:
            serializer = SearchInput(data=data)
            if not serializer.is_valid():
                raise BadInput(error_message(serializer.errors))
            validated = serializer.validated_data
            if "sop_instance_uid" in validated:
                query_instance = _instance_or_404(validated["sop_instance_uid"])
            try:
                results = run_search(serializer)
            except Instance.DoesNotExist:
                raise BadInput(f"no instance with SOPInstanceUID {validated['sop_instance_uid']}", 404) from None
            except SearchError as exc:
                raise BadInput(str(exc)) from None
    except BadInput as exc:
        error, status = str(exc), exc.status
        results = None

    box = data.get("box")
    query_uid = query_instance.sop_instance_uid if query_instance else ""
    kind = results.kind if results else (data.get("kind") or default_kind(box))
    context: dict[str, Any] = {
        "mode": "upload" if upload is not None else ("instance" if data.get("sop_instance_uid") else ""),
        "query_instance": query_instance,
        "query_box": svg_box(box) if box and query_instance else None,
        "box": format_box(box),
        "upload_name": upload.name if upload is not None else "",
        "upload_size": upload.size if upload is not None else 0,
        "results": results,
        "cards": cards(results, query_uid, box, request.user) if results else [],
        "error": error,
        "values": form_values(params, kind),
        "whole_image_url": _url(canonical_query({**validated, "box": None, "kind": None})) if box and validated else "",
    }
    htmx = request.htmx
    partial = bool(htmx) and htmx.target == RESULTS_TARGET and not htmx.history_restore_request
    if partial:
        # An upload changes the query shown above the grid: send it along out of band.
        context["oob"] = request.method == "POST"
        response = render(request, "embeddings/partials/_results.html", context, status=status)
        if results is not None:
            push_url(response, _url(canonical_query(validated)) if upload is None else reverse("search:search"))
    else:
        context["choices"] = with_current(filter_choices(), context["values"])
        response = render(request, "embeddings/search.html", context, status=status)
    patch_vary_headers(response, ["HX-Request", "HX-Target"])
    return response


@require_safe
def compare(request: HttpRequest) -> HttpResponse:
    """The query and one result side by side, window/level and zoom linked (compare.js)."""
    params = request.GET
    in_page = bool(request.htmx) and request.htmx.target == COMPARE_TARGET
    template = "embeddings/partials/_compare.html" if in_page else "embeddings/compare.html"
    try:
        query_box = parse_box(params.get("qbox", ""), "qbox")
        result_box = parse_box(params.get("rbox", ""), "rbox")
        result_uid = params.get("result", "").strip()
        if not result_uid:
            raise BadInput("choose a result to compare with the query")
        result = _instance_or_404(result_uid)
        query_uid = params.get("query", "").strip()
        query = _instance_or_404(query_uid) if query_uid else None
    except BadInput as exc:
        return render(request, template, {"error": str(exc), "in_page": in_page}, status=exc.status)

    rank = _number(params.get("rank"), int)
    score = _number(params.get("score"), float)
    panes = [_pane(query, query_box, "query", "Query"), _pane(result, result_box, "result", f"Result #{rank or '?'}")]
    presets = presets_for(result.series.modality)
    if query is not None:
        query_presets = set(presets_for(query.series.modality))
        presets = [p for p in presets if p in query_presets]
    back = QueryDict(mutable=True)
    if query_uid:
        back["sop_instance_uid"] = query_uid
        if query_box:
            back["box"] = format_box(query_box)
    context = {
        "panes": panes,
        "presets": presets,
        "rank": rank,
        "score": score,
        "in_page": in_page,
        "back_url": _url(back),
        "has_findings": any(pane["boxes"] for pane in panes),
        "feedback": (
            {
                "key": f"{rank}-{result.sop_instance_uid}-{format_box(result_box)}",
                "query_sop_instance_uid": query_uid,
                "query_box": format_box(query_box),
                "result_sop_instance_uid": result.sop_instance_uid,
                "result_box": format_box(result_box),
                "rank": rank,
                "score": score,
            }
            if rank and score is not None
            else None
        ),
    }
    context["feedback_saved"] = (
        selectors.feedback_given(
            user=request.user, query_uid=query_uid, query_box=query_box, result_uids=[result.sop_instance_uid]
        ).get((result.sop_instance_uid, selectors.box_key(result_box)))
        if context["feedback"]
        else None
    )
    response = render(request, template, context)
    patch_vary_headers(response, ["HX-Request", "HX-Target"])
    return response


@require_POST
def feedback(request: HttpRequest) -> HttpResponse:
    """ "Relevant / not relevant" on one result: a SearchFeedback row, and the buttons
    again showing the verdict (a second click stores a second verdict)."""
    params = request.POST
    values = {
        name: params.get(name, "").strip()
        for name in ("query_sop_instance_uid", "query_box", "result_sop_instance_uid", "result_box", "rank", "score")
    }
    values["key"] = params.get("key", "")
    context: dict[str, Any] = {"fb": values, "saved": None, "error": ""}
    status = 200
    try:
        data: dict[str, Any] = {
            "query_sop_instance_uid": values["query_sop_instance_uid"],
            "result_sop_instance_uid": values["result_sop_instance_uid"],
            "rank": values["rank"],
            "score": values["score"],
            "relevant": params.get("relevant", ""),
        }
        query_box = parse_box(values["query_box"], "query_box")
        if query_box is not None:
            data["query_box"] = query_box
        data["result_box"] = parse_box(values["result_box"], "result_box")
        serializer = FeedbackInput(data=data)
        if not serializer.is_valid():
            raise BadInput(error_message(serializer.errors))
        try:
            row = services.feedback_record(user=request.user, **serializer.validated_data)
        except Instance.DoesNotExist:
            raise BadInput("the query or result image no longer exists", 404) from None
        context["saved"] = "relevant" if row.relevant else "not-relevant"
    except BadInput as exc:
        context["error"], status = str(exc), exc.status
    if not request.htmx:
        # Without JavaScript the buttons post a plain form: go back where they were.
        back = request.META.get("HTTP_REFERER", "")
        if url_has_allowed_host_and_scheme(back, {request.get_host()}, request.is_secure()) and status == 200:
            return HttpResponseRedirect(back)
    return render(request, "embeddings/partials/_feedback.html", context, status=status)


# --- helpers -----------------------------------------------------------------------------------


def _instance_or_404(sop_instance_uid: str) -> Instance:
    try:
        return study_selectors.instance_get(sop_instance_uid=sop_instance_uid)
    except Instance.DoesNotExist:
        raise BadInput(f"no instance with SOPInstanceUID {sop_instance_uid}", 404) from None


def _pane(instance: Instance | None, box, role: str, title: str) -> dict[str, Any]:
    return {
        "role": role,
        "title": title,
        "instance": instance,
        "box": svg_box(box) if box else None,
        "boxes": overlay_boxes(instance) if instance is not None else [],
        # The frame the search embedded: the middle of a multi-frame image.
        "frame": services.representative_frame(instance) if instance is not None else 1,
        "viewer_image_size": VIEWER_IMAGE_SIZE,
    }


def _number(value: str | None, kind):
    try:
        number = kind(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _url(query: QueryDict) -> str:
    url = reverse("search:search")
    return f"{url}?{query.urlencode()}" if query else url
