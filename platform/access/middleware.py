"""Enforce the access policy on pages and write the audit log for pages, REST and DICOMweb.

What gets an audit row, and why:

- Every change: any POST/PUT/PATCH/DELETE (uploads and STOW-RS as "ingest", searches
  sent as POST as "search", exports as "export", the rest as "change").
- Views of studies and instances (study page, viewer, evidence, comparison, REST
  detail and preview, DICOMweb metadata), downloads (REST file, every WADO-RS
  retrieval including rendered images and frames), searches (search page with a query,
  REST search, every QIDO-RS query), list pages (study list, worklist), the audit log
  itself and its CSV export.
- Every refusal (401, 403) anywhere, with the policy's reason.
- Logins, logouts and failed logins come from Django's auth signals (receivers.py),
  not from here, so the login form's POST is not counted twice.

What does not: static files (WhiteNoise answers them before this middleware runs, and
they carry no patient data); thumbnails (`api:instance-thumbnail`), which the study
list and study page fetch by the dozen and which only repeat the page view already
logged for that study; mask PNGs (`triage-api:instance-mask`), drawn over an image
whose overlays request is logged; the worklist's polling bar (`triage:changes`, every
few seconds); OPTIONS requests; GETs of other pages that name no study or instance.

A view may record its own row with more detail (`audit_record(request=...)`, as the
exports do); the middleware then writes none for that request.

A failure to write an audit row is logged and does not turn a served answer into an
error; the database trigger makes the rows that were written permanent.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed
from django.shortcuts import render
from rest_framework.views import APIView

from precedent.api import body_over_limit

from . import policy
from .enforce import check_request
from .models import Outcome
from .services import audit_record

log = logging.getLogger(__name__)

VIEW, DOWNLOAD, SEARCH, LIST = "view", "download", "search", "list"
EXPORT, INGEST, CHANGE, ACCESS = "export", "ingest", "change", "access"

# Safe-method (GET/HEAD) requests worth a row, by URL name.
READ_ACTIONS: dict[str, str] = {
    "studies:list": LIST,
    "studies:detail": VIEW,
    "studies:viewer": VIEW,
    "triage:worklist": LIST,
    "triage:evidence": VIEW,
    "search:search": SEARCH,  # only with a query (the empty form is not a search)
    "search:compare": VIEW,
    "api:study-list": LIST,
    "api:study-detail": VIEW,
    "api:instance-detail": VIEW,
    "api:instance-preview": VIEW,
    "api:instance-file": DOWNLOAD,
    "triage-api:worklist": LIST,
    "triage-api:study-triage": VIEW,
    "dicomweb:studies": SEARCH,
    "dicomweb:all-series": SEARCH,
    "dicomweb:all-instances": SEARCH,
    "dicomweb:study-series": SEARCH,
    "dicomweb:study-instances": SEARCH,
    "dicomweb:series-instances": SEARCH,
    "dicomweb:study-metadata": VIEW,
    "dicomweb:series-metadata": VIEW,
    "dicomweb:instance-metadata": VIEW,
    "dicomweb:study": DOWNLOAD,
    "dicomweb:series": DOWNLOAD,
    "dicomweb:instance": DOWNLOAD,
    "dicomweb:instance-bulk": DOWNLOAD,
    "dicomweb:instance-rendered": DOWNLOAD,
    "dicomweb:frames": DOWNLOAD,
    "dicomweb:frames-rendered": DOWNLOAD,
    "access:audit-log": VIEW,
    "access:audit-export": EXPORT,
}
NOT_AUDITED = frozenset(
    {
        "api:instance-thumbnail",
        "triage-api:instance-mask",  # drawn over an image whose overlays request is logged
        "triage:changes",
        "login",
        "logout",
        "admin:login",
        "admin:logout",
    }
)
# Changes with a more telling name than "change".
WRITE_ACTIONS: dict[str, str] = {
    "api:instance-upload": INGEST,
    "dicomweb:studies": INGEST,
    "dicomweb:study": INGEST,
    "search:search": SEARCH,
    "search-api:search": SEARCH,
}
# URL keyword arguments naming a target, most specific first.
TARGET_KWARGS: tuple[tuple[str, str], ...] = (
    ("sop_instance_uid", "instance"),
    ("instance", "instance"),
    ("series_instance_uid", "series"),
    ("series", "series"),
    ("study_instance_uid", "study"),
    ("study", "study"),
)
SAFE_METHODS = frozenset({"GET", "HEAD"})
# Search parameters kept in a row: what was asked, not uploaded bytes or vectors.
_MAX_DETAIL_VALUE = 200


def is_api_view(view_func: Callable[..., Any]) -> bool:
    cls = getattr(view_func, "cls", None)
    return isinstance(cls, type) and issubclass(cls, APIView)


class AccessMiddleware:
    """Pages: refuse what policy.py does not allow (403 page, login redirect, 405).
    Everything: write the audit row the request deserves (see the module docstring)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        try:
            audit_response(request, response)
        except Exception:
            log.exception("cannot write the audit row for %s %s", request.method, request.path)
        return response

    def process_view(self, request: HttpRequest, view_func, view_args, view_kwargs) -> HttpResponse | None:
        if is_api_view(view_func):
            return None  # DRF authenticates in the view; access.permissions decides there
        decision = check_request(request, user=request.user)
        if decision.allowed:
            too_large = body_over_limit(request) if request.method == "POST" else None
            if too_large:  # before the CSRF check below would read (and spool) it all
                return HttpResponse(too_large, status=413, content_type="text/plain; charset=utf-8")
            return None
        if decision.status == 401:
            return redirect_to_login(request.get_full_path())
        if decision.status == 405:
            return HttpResponseNotAllowed(policy.allowed_methods(request.resolver_match.view_name))
        return render(request, "access/403.html", {"reason": decision.reason}, status=403)


def classify(request: HttpRequest, response: HttpResponse) -> str | None:
    """The audit action of a request, or None when it gets no row."""
    match = request.resolver_match
    view_name = match.view_name if match is not None else ""
    method = (request.method or "").upper()
    if response.status_code in (401, 403):
        # Every refusal gets a row, named for what was attempted.
        if method in SAFE_METHODS:
            return READ_ACTIONS.get(view_name, ACCESS)
        return WRITE_ACTIONS.get(view_name, EXPORT if "export" in view_name else CHANGE)
    if match is None or view_name in NOT_AUDITED or method == "OPTIONS":
        return None
    if method not in SAFE_METHODS:
        if "export" in view_name:
            return EXPORT
        return WRITE_ACTIONS.get(view_name, CHANGE)
    if view_name == "search:search" and not request.GET:
        return None
    if view_name in READ_ACTIONS:
        return READ_ACTIONS[view_name]
    # URLs other parts add later: exports and anything naming a study or instance.
    if "export" in view_name:
        return EXPORT
    if target_of(request)[1]:
        return VIEW
    return None


def target_of(request: HttpRequest) -> tuple[str, str]:
    match = request.resolver_match
    kwargs = match.kwargs if match is not None else {}
    for key, kind in TARGET_KWARGS:
        if kwargs.get(key):
            return kind, str(kwargs[key])
    return "", ""


def audit_response(request: HttpRequest, response: HttpResponse) -> None:
    if getattr(request, "access_audited", False):
        return  # the view recorded this request itself, with more to say (e.g. exports)
    action = classify(request, response)
    if action is None:
        return
    status = response.status_code
    if status in (401, 403):
        outcome = Outcome.DENIED
    elif status >= 400:
        outcome = Outcome.ERROR
    else:
        outcome = Outcome.OK
    target_type, target = target_of(request)
    details: dict[str, Any] = {}
    decision = getattr(request, "access_decision", None)
    if outcome == Outcome.DENIED:
        details["reason"] = decision.reason if decision is not None and not decision.allowed else _error_of(response)
    if decision is not None and decision.permission:
        details["permission"] = decision.permission
    scopes = getattr(request, "access_token_scopes", None)
    if scopes is not None:
        details["token_scopes"] = scopes
    if action == SEARCH:
        details["query"] = _query_of(request, response)
    if action == INGEST:
        target_type, target, ingested = _ingested(response, target_type, target)
        details.update(ingested)
    if outcome == Outcome.ERROR:
        details["error"] = _error_of(response)
    audit_record(
        action=action,
        request=request,
        target_type=target_type,
        target=target,
        details=details,
        outcome=outcome,
        status_code=status,
    )


def _drf_data(response: HttpResponse) -> Any:
    return getattr(response, "data", None)


def _error_of(response: HttpResponse) -> str:
    data = _drf_data(response)
    if isinstance(data, dict) and "error" in data:
        return str(data["error"])[:_MAX_DETAIL_VALUE]
    return ""


def _short(value: Any) -> Any:
    if isinstance(value, bool | int | float) or value is None:
        return value
    if isinstance(value, str):
        return value[:_MAX_DETAIL_VALUE]
    return None  # files, vectors, nested structures: not what was asked, just its bulk


def _query_of(request: HttpRequest, response: HttpResponse) -> dict[str, Any]:
    """The parameters of a search: the query string, or a DRF request's parsed body."""
    params: dict[str, Any] = {key: _short(value) for key, value in request.GET.items()}
    drf_request = (getattr(response, "renderer_context", None) or {}).get("request")
    data = getattr(drf_request, "_full_data", None) if drf_request is not None else None
    # A form the view read (Django keeps it as `_post`); never read a body for the audit
    # alone: a refused request (a login redirect, a 403) leaves its upload unread.
    if data is None and hasattr(request, "_post"):
        data = request.POST
    if hasattr(data, "items"):
        for key, value in data.items():
            short = _short(value)
            if short is not None:
                params[key] = short
    return {key: value for key, value in params.items() if value is not None}


def _ingested(response: HttpResponse, target_type: str, target: str) -> tuple[str, str, dict[str, Any]]:
    """What an upload stored: counts and instance UIDs (REST, or STOW-RS's Store
    Instances Response), target the study when one."""
    data = _drf_data(response)
    if response.get("Content-Type", "").startswith("application/dicom+json"):
        return _stow_ingested(response, target_type, target)
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        return target_type, target, {}
    results = [item for item in data["results"] if isinstance(item, dict)]
    studies = {item["study_instance_uid"] for item in results if item.get("study_instance_uid")}
    details = {key: data[key] for key in ("stored", "duplicates", "rejected") if key in data}
    details["instances"] = [item["sop_instance_uid"] for item in results if item.get("sop_instance_uid")][:100]
    if not target and len(studies) == 1:
        target_type, target = "study", studies.pop()
    return target_type, target, details


def _stow_ingested(response: HttpResponse, target_type: str, target: str) -> tuple[str, str, dict[str, Any]]:
    """STOW-RS answers in DICOM JSON: ReferencedSOPSequence (0008,1199) lists what was
    stored, FailedSOPSequence (0008,1198) what was not; the study comes from the rows."""
    from studies.models import Instance

    try:
        body = json.loads(response.content)
    except ValueError:
        return target_type, target, {}
    if not isinstance(body, dict):
        return target_type, target, {}

    def items(tag: str) -> list[dict[str, Any]]:
        value = body.get(tag, {}).get("Value", []) if isinstance(body.get(tag), dict) else []
        return [item for item in value if isinstance(item, dict)]

    stored = [
        uid
        for item in items("00081199")
        for uid in (item.get("00081155", {}).get("Value") or [])[:1]
        if isinstance(uid, str)
    ]
    details: dict[str, Any] = {
        "stored": len(stored),
        "rejected": len(items("00081198")),
        "instances": stored[:100],
    }
    studies = set(
        Instance.objects.filter(sop_instance_uid__in=stored[:100])
        .values_list("series__study__study_instance_uid", flat=True)
        .distinct()[:2]
    )
    if not target and len(studies) == 1:
        target_type, target = "study", studies.pop()
    return target_type, target, details
