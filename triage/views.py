"""Worklist pages (htmx): thin views over the same selectors and services as the API.

The list is swapped as a partial when the filters change. A small bar polls
`worklist_changes` every POLL_SECONDS and announces "N new studies — Show". While the
radiologist is at the top of the first page and idle, static/js/worklist.js takes the
new studies in by itself; otherwise they come in with "Show", which keeps the first row
in view where it was, so rows never move under someone using the list. Read marks swap
one row; evidence (similar confirmed cases) loads per flagged
row when it scrolls into view, so the list never waits for a search.
"""

from __future__ import annotations

import datetime as dt
import numbers
from dataclasses import dataclass
from functools import wraps
from typing import Any

from django import forms
from django.contrib.auth.decorators import login_required
from django.core.paginator import Page, Paginator
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseForbidden, HttpResponseRedirect, QueryDict
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.utils import timezone
from django.utils.cache import patch_vary_headers
from django.utils.dateparse import parse_datetime
from django.views.decorators.http import require_POST, require_safe
from django_htmx.http import push_url

from studies.forms import ModalityDateFilterForm
from studies.models import Study
from studies.views import canonical_query

from . import selectors, services
from .models import Category, OperatingPoint

STUDIES_PER_PAGE = 50
POLL_SECONDS = 10
LIST_TARGET = "worklist-results"


class WorklistFilterForm(ModalityDateFilterForm):
    """The worklist filters from the query string; a bad value is reported and ignored."""

    category = forms.MultipleChoiceField(
        required=False, choices=Category.choices, widget=forms.CheckboxSelectMultiple, label="Category"
    )
    include_read = forms.BooleanField(required=False, label="Show read studies")

    def selector_filters(self) -> dict[str, Any]:
        data = self.cleaned_data
        return {
            "modality": data.get("modality", ""),
            "date_from": data.get("date_from"),
            "date_to": data.get("date_to"),
            "categories": data.get("category", []),
            "include_read": data.get("include_read", False),
        }


def filtered_worklist(params: QueryDict):
    form = WorklistFilterForm(params)
    form.is_valid()  # keeps the fields that validated; the template lists the others as ignored
    return form, selectors.worklist(**form.selector_filters())


# The exam-level numbers a row shows, in this order (exam_score.study_scores).
EXAM_SCORES = (("p_abnormal", "P(abnormal)"), ("p_malignant", "P(malignant)"), ("p_detector", "best box"))


def score_items(scores: dict | None) -> list[tuple[str, float]]:
    """The exam-level scores of a TriageResult as (label, value) for a worklist row;
    per-image and per-breast detail stays on the study page and in the API. The fused
    score, which no single model gives, comes first under its own name."""
    scores = scores or {}
    exam = scores.get("exam") if isinstance(scores.get("exam"), dict) else {}

    def number(value) -> bool:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)

    items = [(label, float(exam[key])) for key, label in EXAM_SCORES if number(exam.get(key))]
    if scores.get("score_source") == "fused" and number(exam.get("score")):
        items.insert(0, ("fused", float(exam["score"])))
    # Flat numbers at the top level (a result written by hand or by an older version).
    items += [(name, float(value)) for name, value in scores.items() if number(value)]
    return items


def decorate(study: Study) -> Study:
    """What a row shows beyond the annotations: the category's label and the
    exam-level scores."""
    study.category_label = Category(study.category).label
    study.badge = f"triage-{study.category}"
    if study.category == Category.NOT_ASSESSABLE and study.rank == selectors.OUTSIDE_TRIAGE:
        study.category_label, study.badge = "Outside triage", "triage-outside"  # no task covers its images
    study.flagged = study.category in selectors.FLAGGED
    study.score_items = score_items(study.scores)
    return study


@dataclass
class Group:
    section: selectors.Section
    studies: list[Study]


def page_groups(page: Page, sections: list[selectors.Section]) -> list[Group]:
    by_rank = {section.rank: section for section in sections}
    groups: list[Group] = []
    for study in page:
        if not groups or groups[-1].section.rank != study.rank:
            groups.append(Group(by_rank[study.rank], []))
        groups[-1].studies.append(decorate(study))
    return groups


@require_safe
def worklist(request: HttpRequest) -> HttpResponse:
    query = canonical_query(request.GET)
    form, studies = filtered_worklist(query)
    page = Paginator(studies, STUDIES_PER_PAGE).get_page(request.GET.get("page"))
    sections = selectors.worklist_sections(studies)
    context = {
        "form": form,
        "page": page,
        "groups": page_groups(page, sections),
        "sections": sections,
        "query": query,
        "poll_query": without_page(query),
        "since": timezone.now().isoformat(),
        "poll_seconds": POLL_SECONDS,
    }
    partial = bool(request.htmx) and request.htmx.target == LIST_TARGET and not request.htmx.history_restore_request
    if partial:
        response = render(request, "triage/partials/_worklist.html", context)
        url = reverse("triage:worklist")
        push_url(response, f"{url}?{query.urlencode()}" if query else url)
    else:
        response = render(request, "triage/worklist.html", context)
    patch_vary_headers(response, ["HX-Request", "HX-Target"])
    return response


@require_safe
def worklist_changes(request: HttpRequest) -> HttpResponse:
    """The polling bar: how many studies arrived (or were flagged) since the list was drawn."""
    query = without_page(canonical_query(request.GET))
    since = parse_since(query.pop("since", [""])[-1])
    _form, studies = filtered_worklist(query)
    context = {
        "changes": selectors.worklist_changes(studies, since=since),
        "since": since.isoformat(),
        "query": query,
        "poll_seconds": POLL_SECONDS,
    }
    return render(request, "triage/partials/_changes.html", context)


def without_page(query: QueryDict) -> QueryDict:
    """The filters alone: "Show" after new arrivals starts from the first page."""
    filters = query.copy()
    filters.pop("page", None)
    return filters


def parse_since(value: str) -> dt.datetime:
    """The bar's reference time; a missing or garbled one counts from now (no bar)."""
    try:
        since = parse_datetime(value)
    except ValueError:  # well formed but impossible, e.g. month 13
        since = None
    if since is None:
        return timezone.now()
    return timezone.make_aware(since) if timezone.is_naive(since) else since


@require_POST
def mark_read(request: HttpRequest, study_instance_uid: str) -> HttpResponse:
    """Mark a study read (read=1) or unread (read=0). htmx gets the row back, dimmed
    with an undo button rather than removed, so the rows under the cursor do not move."""
    study = get_object_or_404(Study, study_instance_uid=study_instance_uid)
    services.study_mark_read(study=study, user=request.user, read=request.POST.get("read", "1") != "0")
    if not request.htmx:
        return HttpResponseRedirect(reverse("triage:worklist"))
    row = decorate(selectors.worklist(include_read=True).get(pk=study.pk))
    return render(request, "triage/partials/_row.html", {"study": row})


@require_safe
def evidence(request: HttpRequest, study_instance_uid: str) -> HttpResponse:
    """Similar confirmed prior cases for one flagged study (empty when search cannot answer)."""
    study = get_object_or_404(Study, study_instance_uid=study_instance_uid)
    return render(request, "triage/partials/_evidence.html", {"evidence": selectors.study_evidence(study=study)})


# --- calibration (admins): operating points, their curves, sign-off ------------------------


def _admin_only(view):
    """Admins only (staff or superuser), on top of the access policy's ADMIN rule: a
    sign-off changes what every radiologist's worklist rules out."""

    @login_required
    @wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not selectors.user_can_sign_off(user=request.user):
            return HttpResponseForbidden("only an admin can see and sign off operating points")
        return view(request, *args, **kwargs)

    return wrapped


@require_safe
@_admin_only
def calibration(request: HttpRequest) -> HttpResponse:
    """Operating points, newest first, each with its validation numbers and curves."""
    points = list(selectors.operating_points()[:50])
    return render(request, "triage/calibration.html", {"points": points})


@require_safe
@_admin_only
def calibration_curves(request: HttpRequest, pk: int) -> HttpResponse:
    """The point's ROC and workload curves (validation run) as a PNG."""
    from . import metrics

    point = get_object_or_404(OperatingPoint, pk=pk)
    curve = point.validation.get("curve") or []
    if not curve:
        raise Http404("this operating point has no validation curves")
    png = metrics.plot_curves(
        curve,
        title=f"operating point {point.pk} ({point.score_source} score) on {point.validation_cohort or 'no cohort'}",
        operating_point={
            "threshold": point.threshold,
            "sensitivity": point.sensitivity,
            "specificity": point.specificity,
            "workload_reduction": point.workload_reduction,
        },
    )
    response = HttpResponse(png, content_type="image/png")
    response["Cache-Control"] = "private, max-age=60"
    return response


@require_POST
@_admin_only
def calibration_at_threshold(request: HttpRequest, pk: int) -> HttpResponse:
    """Another threshold picked on a point's curve becomes a new point, not signed off
    yet: the admin reads its figures, then signs it off like any other."""
    point = get_object_or_404(OperatingPoint, pk=pk)
    try:
        threshold = float(request.POST.get("threshold", ""))
    except ValueError:
        return HttpResponse("choose a threshold from the list", status=400, content_type="text/plain")
    try:
        derived = services.operating_point_at_threshold(point=point, threshold=threshold)
    except ValueError as exc:  # not on the curve, or no validation run behind the point
        return HttpResponse(str(exc), status=400, content_type="text/plain")
    return HttpResponseRedirect(f"{reverse('triage:calibration')}#operating-point-{derived.pk}")


@require_POST
@_admin_only
def calibration_sign_off(request: HttpRequest, pk: int) -> HttpResponse:
    """Sign off a computed point (audited); htmx gets its row back."""
    point = get_object_or_404(OperatingPoint, pk=pk)
    error = ""
    try:
        point = services.operating_point_sign_off(point=point, user=request.user, via="web", request=request)
    except ValueError as exc:
        error = str(exc)
    if not request.htmx:
        if error:
            return HttpResponse(error, status=409, content_type="text/plain")
        return HttpResponseRedirect(reverse("triage:calibration"))
    point = selectors.operating_points().get(pk=point.pk)
    return render(
        request, "triage/partials/_operating_point.html", {"point": point, "error": error}, status=409 if error else 200
    )
