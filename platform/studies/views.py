"""Pages (htmx): thin views over the same selectors and services as the API.

Every page needs a logged-in user (LoginRequiredMiddleware). htmx requests get only
the partial they swap; the same URL without htmx gives the whole page, so every state
the browser pushes into its address bar can be shared and reloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django import forms
from django.conf import settings
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect, QueryDict
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.cache import patch_vary_headers
from django.views.decorators.http import require_safe
from django_htmx.http import push_url

from . import selectors
from .dicom import presets_for
from .forms import ModalityDateFilterForm
from .models import Cohort, Instance, Study, format_person_name

STUDIES_PER_PAGE = 25
# Longest side of the viewer image: a 4736×2624 mammogram stays responsive at 2048,
# and the overlay scales with it because its viewBox is in true image pixels.
VIEWER_IMAGE_SIZE = 2048
SORT_COLUMNS = [("patient", "Patient"), ("date", "Study date"), ("accession", "Accession"), ("arrival", "Arrived")]
LIST_TARGET = "study-results"


class StudyFilterForm(ModalityDateFilterForm):
    """The study list's filters from the query string; a bad value is reported and ignored."""

    q = forms.CharField(
        required=False,
        max_length=200,
        label="Search",
        widget=forms.SearchInput(attrs={"placeholder": "Patient name or ID, accession", "autocomplete": "off"}),
    )
    cohort = forms.ModelChoiceField(
        required=False, queryset=Cohort.objects.all(), to_field_name="name", empty_label="Any cohort"
    )
    sort = forms.ChoiceField(required=False, choices=[(key, key) for key in selectors.SORTS])

    def selector_filters(self) -> dict[str, Any]:
        """Keyword arguments for selectors.study_list from the fields that validated."""
        data = self.cleaned_data
        cohort = data.get("cohort")
        return {
            "q": data.get("q", ""),
            "modality": data.get("modality", ""),
            "date_from": data.get("date_from"),
            "date_to": data.get("date_to"),
            "cohort": cohort.name if cohort else "",
            "sort": data.get("sort") or selectors.DEFAULT_SORT,
        }


@dataclass(frozen=True)
class SortColumn:
    label: str
    next_sort: str  # what a click on the header asks for
    aria_sort: str  # "ascending", "descending" or "none"


def sort_columns(current: str) -> dict[str, SortColumn]:
    columns = {}
    for key, label in SORT_COLUMNS:
        active = current in (key, f"-{key}")
        first = selectors.SORTS[current][0]  # "-field" or an OrderBy expression
        descending = getattr(first, "descending", str(first).startswith("-"))
        columns[key] = SortColumn(
            label=label,
            next_sort=f"-{key}" if current == key else key,
            aria_sort=("descending" if descending else "ascending") if active else "none",
        )
    return columns


def canonical_query(query: QueryDict) -> QueryDict:
    """The query string without empty parameters, so pushed URLs stay short."""
    clean = QueryDict(mutable=True)
    for key, values in query.lists():
        kept = [v for v in values if v.strip()]
        if kept:
            clean.setlist(key, kept)
    return clean


@require_safe
def home(request: HttpRequest) -> HttpResponse:
    """The home page: the worklist for those who read from it (radiologists), the
    study list for everyone else."""
    from access.policy import WORKLIST
    from access.selectors import user_permissions

    target = "triage:worklist" if WORKLIST in user_permissions(user=request.user) else "studies:list"
    return redirect(target)


@require_safe
def study_list(request: HttpRequest) -> HttpResponse:
    form = StudyFilterForm(request.GET)
    form.is_valid()  # keeps the fields that validated; the template lists the others as ignored
    filters = form.selector_filters()
    page = Paginator(selectors.study_list(**filters), STUDIES_PER_PAGE).get_page(request.GET.get("page"))
    query = canonical_query(request.GET)
    context = {
        "form": form,
        "page": page,
        "sort": filters["sort"],
        "columns": sort_columns(filters["sort"]),
        "query": query,
    }
    # Only requests aimed at the results swap the partial; a history restore or a
    # boosted link from another page needs the whole page.
    partial = bool(request.htmx) and request.htmx.target == LIST_TARGET and not request.htmx.history_restore_request
    if partial:
        response = render(request, "studies/partials/_study_table.html", context)
        url = reverse("studies:list")
        push_url(response, f"{url}?{query.urlencode()}" if query else url)
    else:
        response = render(request, "studies/study_list.html", context)
    patch_vary_headers(response, ["HX-Request", "HX-Target"])
    return response


@dataclass(frozen=True)
class OverlayBox:
    """One ground-truth box, in true image pixels (the SVG viewBox's coordinates)."""

    x: float
    y: float
    width: float
    height: float
    label: str
    pathology: str
    label_inside: bool  # a box at the top edge has no room for its label above it


def overlay_boxes(instance: Instance) -> list[OverlayBox]:
    boxes = []
    for finding in instance.findings.all():
        if finding.box is None:
            continue
        x0, y0, x1, y1 = finding.box
        label = " · ".join(p for p in (finding.abnormality_class, finding.get_pathology_display()) if p)
        inside = y0 < (instance.rows or 0) * 0.04
        boxes.append(OverlayBox(x0, y0, x1 - x0, y1 - y0, label, finding.pathology, inside))
    return boxes


def viewer_context(instance: Instance) -> dict[str, Any]:
    return {
        "instance": instance,
        "presets": presets_for(instance.series.modality),
        "findings": list(instance.findings.all()),
        "boxes": overlay_boxes(instance),
        "viewer_image_size": VIEWER_IMAGE_SIZE,
    }


def study_or_404(study_instance_uid: str) -> Study:
    try:
        return selectors.study_get(study_instance_uid=study_instance_uid)
    except Study.DoesNotExist:
        raise Http404(f"No study with StudyInstanceUID {study_instance_uid}") from None


def selected_instance(study: Study, sop_instance_uid: str) -> Instance | None:
    """The instance the URL names, else the first with an image, else the first."""
    instances = [instance for series in study.series.all() for instance in series.instances.all()]
    for instance in instances:
        if instance.sop_instance_uid == sop_instance_uid:
            return instance
    return next((i for i in instances if i.is_previewable), instances[0] if instances else None)


@require_safe
def study_detail(request: HttpRequest, study_instance_uid: str) -> HttpResponse:
    study = study_or_404(study_instance_uid)
    selected = selected_instance(study, request.GET.get("instance", ""))
    context: dict[str, Any] = {
        "study": study,
        "selected": selected,
        "referring_physician": format_person_name(study.referring_physician),
    }
    if selected is not None:
        context.update(viewer_context(selected))
    return render(request, "studies/study_detail.html", context)


@require_safe
def instance_viewer(request: HttpRequest, study_instance_uid: str, sop_instance_uid: str) -> HttpResponse:
    """The viewer partial for one instance; without htmx, the study page showing it."""
    try:
        instance = selectors.instance_get(sop_instance_uid=sop_instance_uid)
    except Instance.DoesNotExist:
        raise Http404(f"No instance with SOPInstanceUID {sop_instance_uid}") from None
    if instance.series.study.study_instance_uid != study_instance_uid:
        raise Http404("That instance belongs to another study")
    if not request.htmx:
        return study_page_redirect(study_instance_uid, sop_instance_uid)
    response = render(request, "studies/partials/_viewer.html", viewer_context(instance))
    patch_vary_headers(response, ["HX-Request"])
    return response


def study_page_redirect(study_instance_uid: str, sop_instance_uid: str) -> HttpResponseRedirect:
    query = QueryDict(mutable=True)
    query["instance"] = sop_instance_uid
    return HttpResponseRedirect(f"{reverse('studies:detail', args=[study_instance_uid])}?{query.urlencode()}")


@require_safe
def upload(request: HttpRequest) -> HttpResponse:
    return render(request, "studies/upload.html", {"max_upload_bytes": settings.PRECEDENT_MAX_UPLOAD_BYTES})
