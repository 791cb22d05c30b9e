"""Pages (htmx): thin views over the same selectors and services as the API."""

from __future__ import annotations

from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render

from . import selectors
from .models import Study


def study_list(request: HttpRequest) -> HttpResponse:
    studies = selectors.study_list(q=request.GET.get("q", ""))
    page = Paginator(studies, 25).get_page(request.GET.get("page"))
    return render(request, "studies/study_list.html", {"page": page})


def study_detail(request: HttpRequest, study_instance_uid: str) -> HttpResponse:
    try:
        study = selectors.study_get(study_instance_uid=study_instance_uid)
    except Study.DoesNotExist:
        raise Http404("No such study") from None
    return render(request, "studies/study_detail.html", {"study": study})


def upload(request: HttpRequest) -> HttpResponse:
    return render(request, "studies/upload.html")
