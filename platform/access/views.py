"""The audit log for admins: a filtered, paginated page and its CSV export."""

from __future__ import annotations

from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.http import require_safe

from .csv_export import csv_lines
from .forms import AuditFilterForm
from .selectors import audit_events

EVENTS_PER_PAGE = 50


@require_safe
def audit_log(request: HttpRequest) -> HttpResponse:
    form = AuditFilterForm(request.GET)
    form.is_valid()  # keeps the fields that validated; the page lists the others as ignored
    page = Paginator(audit_events(**form.selector_filters()), EVENTS_PER_PAGE).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    return render(request, "access/audit_log.html", {"form": form, "page": page, "query": query})


@require_safe
def audit_export(request: HttpRequest) -> StreamingHttpResponse:
    """The same filters as the page, every matching event (streamed, not paginated)."""
    form = AuditFilterForm(request.GET)
    form.is_valid()
    events = audit_events(**form.selector_filters()).iterator(chunk_size=2000)
    response = StreamingHttpResponse(csv_lines(events), content_type="text/csv; charset=utf-8")
    stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
    response["Content-Disposition"] = f'attachment; filename="audit-{stamp}.csv"'
    return response
