"""Pages: the "Export de-identified" and "Store as DICOM SR/SEG" buttons post here.

They call the same functions as the REST endpoints (apis.py); a refusal comes back as
a short page with the reason and the same status code.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_POST

from . import apis, services
from .services import ExportError


def _refused(request: HttpRequest, exc: ExportError) -> HttpResponse:
    return render(request, "exports/refused.html", {"reason": exc.reason}, status=exc.http_status)


@require_POST
def deid_export(request: HttpRequest) -> HttpResponse:
    """Form fields `export_study` and/or `export_instance`, each repeatable (named apart
    from the search form's own `sop_instance_uid`, which the results sit beside)."""
    studies = [uid for uid in request.POST.getlist("export_study") if uid]
    instances = [uid for uid in request.POST.getlist("export_instance") if uid]
    try:
        return apis.deid_export(request, study_instance_uids=studies, sop_instance_uids=instances)
    except ExportError as exc:
        return _refused(request, exc)


@require_POST
def ai_results(request: HttpRequest, sop_instance_uid: str) -> HttpResponse:
    """Store the image's model results as SR/SEG, then back to the viewer, which links them."""
    try:
        results = services.ai_results_store(sop_instance_uid=sop_instance_uid)
    except ExportError as exc:
        apis.audit_export(
            request, kind="ai-dicom", target_type="instance", target=sop_instance_uid, outcome="error",
            reason=exc.reason,
        )  # fmt: skip
        return _refused(request, exc)
    apis.audit_export(
        request,
        kind="ai-dicom",
        target_type="instance",
        target=sop_instance_uid,
        stored=[r.instance.sop_instance_uid for r in results],
    )
    study = results[0].instance.series.study.study_instance_uid
    return HttpResponseRedirect(f"{reverse('studies:detail', args=[study])}?instance={sop_instance_uid}")
