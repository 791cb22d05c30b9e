"""Who may do what: the one table every door (pages, REST, DICOMweb) reads.

Read it top to bottom:

1. PERMISSIONS: the things one can be allowed to do.
2. ROLES: which permissions each role (a Django Group of that name) grants. A user's
   permissions are the union over their roles; superusers hold every permission and
   count as admins.
3. VIEWS: for each URL name (`request.resolver_match.view_name`), the permission each
   HTTP method needs. "*" covers the methods not listed; HEAD follows GET, OPTIONS
   needs a login; any other method not listed is answered 405.
   `PUBLIC` views need nobody logged in (the login page, the OpenAPI schema);
   `AUTHENTICATED` ones only a login. A name ending in ":*" covers a whole namespace.
   A view with no entry is denied to everyone but admins ("no access rule for this
   view"), and tests/access/test_policy.py fails for every URL pattern without one, so
   whoever adds a URL adds its line here.

API tokens may carry scopes (`manage.py api_token create USER --scope read ...`): such
a token acts only with the permissions that are both in its scopes and granted by its
user's roles, and reaches DICOMweb only with the "dicomweb" scope.

This module is pure: no Django imports, so the table can be read and tested alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# --- 1. permissions ------------------------------------------------------------------

READ = "read"  # studies, series, instances, metadata, rendered images, DICOMweb queries
DOWNLOAD = "download"  # DICOM files and raw frames out of the archive (REST file, WADO-RS)
WORKLIST = "worklist"  # the triage worklist and a study's triage result
SEARCH = "search"  # similar-case search
TRIAGE = "triage"  # triage actions: override a category, mark a study read
FEEDBACK = "feedback"  # feedback on search results
INGEST = "ingest"  # upload / STOW-RS / REST upload
EXPORT = "export"  # DICOM SR/SEG and de-identified exports
ADMIN = "admin"  # users, calibration sign-off, the audit log

PERMISSIONS: tuple[str, ...] = (READ, DOWNLOAD, WORKLIST, SEARCH, TRIAGE, FEEDBACK, INGEST, EXPORT, ADMIN)

# Pseudo-permissions for the view table only (never granted, never a token scope).
PUBLIC = "public"
AUTHENTICATED = "authenticated"

# A token scope that is a channel, not a permission: DICOMweb needs it on scoped tokens.
DICOMWEB = "dicomweb"
TOKEN_SCOPES: tuple[str, ...] = (*PERMISSIONS, DICOMWEB)

# --- 2. roles ------------------------------------------------------------------------

RADIOLOGIST = "radiologist"
TECHNOLOGIST = "technologist"
INTEGRATOR = "integrator"
ADMIN_ROLE = "admin"

ROLES: dict[str, frozenset[str]] = {
    # Reads, searches, acts on the worklist; does not upload.
    RADIOLOGIST: frozenset({READ, DOWNLOAD, WORKLIST, SEARCH, TRIAGE, FEEDBACK, EXPORT}),
    # Uploads and checks in the viewer what arrived; no search, no triage decisions,
    # no taking files out of the archive.
    TECHNOLOGIST: frozenset({READ, WORKLIST, INGEST}),
    # Systems over REST/DICOMweb; what one token may do is narrowed by its scopes.
    INTEGRATOR: frozenset({READ, DOWNLOAD, WORKLIST, SEARCH, INGEST}),
    # Oversight: users, calibration sign-off, the audit log; sees and exports studies,
    # but clinical actions stay with the clinical roles (superusers hold everything).
    ADMIN_ROLE: frozenset({ADMIN, READ, WORKLIST, EXPORT}),
}

ROLE_DESCRIPTIONS: dict[str, str] = {
    RADIOLOGIST: "read and download studies, search, triage actions (override, read marks), feedback, export",
    TECHNOLOGIST: "upload/ingest, see the worklist and studies in the viewer",
    INTEGRATOR: "API access (REST, DICOMweb) limited by each token's scopes",
    ADMIN_ROLE: "users, calibration sign-off, the audit log; read and export",
}

# --- 3. views ------------------------------------------------------------------------

_ANY = "*"

VIEWS: dict[str, dict[str, str]] = {
    # Authentication and documentation
    "login": {_ANY: PUBLIC},
    "favicon": {_ANY: PUBLIC},  # browsers ask for /favicon.ico on pages that name no icon (admin, API docs)
    "logout": {_ANY: AUTHENTICATED},
    "schema": {_ANY: PUBLIC},
    "schema-docs": {_ANY: PUBLIC},
    # Django's admin site: admins only (it checks is_staff and model permissions too).
    "admin:login": {_ANY: PUBLIC},
    "admin:logout": {_ANY: AUTHENTICATED},
    "admin:*": {_ANY: ADMIN},
    # Study pages
    "studies:home": {"GET": READ},  # a redirect: the worklist or the study list
    "studies:list": {"GET": READ},
    "studies:detail": {"GET": READ},
    "studies:viewer": {"GET": READ},
    "studies:upload": {"GET": INGEST},
    # Worklist pages
    "triage:worklist": {"GET": WORKLIST},
    "triage:changes": {"GET": WORKLIST},
    "triage:read": {"POST": TRIAGE},
    "triage:evidence": {"GET": WORKLIST},
    "triage:calibration": {"GET": ADMIN},
    "triage:calibration-curves": {"GET": ADMIN},
    "triage:calibration-sign-off": {"POST": ADMIN},
    "triage:calibration-at-threshold": {"POST": ADMIN},
    # Search pages (POST searches with an uploaded image: still a search)
    "search:search": {"GET": SEARCH, "POST": SEARCH},
    "search:compare": {"GET": SEARCH},
    "search:feedback": {"POST": FEEDBACK},
    # REST: studies and instances
    "api:study-list": {"GET": READ},
    "api:study-detail": {"GET": READ},
    "api:instance-upload": {"POST": INGEST},
    "api:instance-detail": {"GET": READ},
    "api:instance-file": {"GET": DOWNLOAD},
    "api:instance-preview": {"GET": READ},
    "api:instance-thumbnail": {"GET": READ},
    # REST: triage
    "triage-api:worklist": {"GET": WORKLIST},
    "triage-api:study-triage": {"GET": WORKLIST, "POST": TRIAGE},
    "triage-api:instance-overlays": {"GET": READ},
    "triage-api:instance-mask": {"GET": READ},
    # REST: search (POST runs a query; it changes nothing)
    "search-api:search": {"POST": SEARCH},
    "search-api:feedback": {"POST": FEEDBACK},
    # DICOMweb: STOW-RS is the POST on studies (and on one study); QIDO-RS, metadata and
    # rendered images read; WADO-RS of instances, frames and bulk data downloads.
    "dicomweb:studies": {"GET": READ, "POST": INGEST},
    "dicomweb:study": {"GET": DOWNLOAD, "POST": INGEST},
    "dicomweb:study-metadata": {"GET": READ},
    "dicomweb:study-series": {"GET": READ},
    "dicomweb:study-instances": {"GET": READ},
    "dicomweb:series": {"GET": DOWNLOAD},
    "dicomweb:series-metadata": {"GET": READ},
    "dicomweb:series-instances": {"GET": READ},
    "dicomweb:instance": {"GET": DOWNLOAD},
    "dicomweb:instance-metadata": {"GET": READ},
    "dicomweb:instance-rendered": {"GET": READ},
    "dicomweb:instance-bulk": {"GET": DOWNLOAD},
    "dicomweb:frames": {"GET": DOWNLOAD},
    "dicomweb:frames-rendered": {"GET": READ},
    "dicomweb:all-series": {"GET": READ},
    "dicomweb:all-instances": {"GET": READ},
    # Exports: de-identified zips and AI results stored as DICOM SR/SEG (audited)
    "exports:deid": {"POST": EXPORT},
    "exports:ai-results": {"POST": EXPORT},
    "exports-api:deid": {"POST": EXPORT},
    "exports-api:ai-results": {"POST": EXPORT},
    # The audit log
    "access:audit-log": {"GET": ADMIN},
    "access:audit-export": {"GET": ADMIN},
}

# --- the decision --------------------------------------------------------------------

NO_RULE = "no access rule for this view"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    permission: str  # what the request needed ("" when no rule applies)
    reason: str = ""  # why not, in one line, for the 403 body and the audit log
    status: int = 403  # of a refusal: 401 without a login, 405 for a method the view lacks


def rule_for(view_name: str) -> Mapping[str, str] | None:
    """The method → permission entry of a URL name, its namespace's ":*" entry, or None."""
    if view_name in VIEWS:
        return VIEWS[view_name]
    namespace, _, _ = view_name.rpartition(":")
    while namespace:
        if f"{namespace}:*" in VIEWS:
            return VIEWS[f"{namespace}:*"]
        namespace, _, _ = namespace.rpartition(":")
    return None


def allowed_methods(view_name: str) -> list[str]:
    """The methods the table lists for a view (for a 405's Allow header)."""
    rule = rule_for(view_name) or {}
    if _ANY in rule:
        return []
    methods = set(rule)
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods | {"OPTIONS"})


def required_permission(view_name: str, method: str) -> str | None:
    """The permission `method` on `view_name` needs; None when the table has no rule
    (unknown view, or a method that view does not list)."""
    rule = rule_for(view_name)
    if rule is None:
        return None
    method = method.upper()
    if method == "HEAD" and method not in rule:
        method = "GET"
    if method == "OPTIONS" and method not in rule and _ANY not in rule:
        return AUTHENTICATED  # describes the view; reads and changes nothing
    return rule.get(method) or rule.get(_ANY)


def role_permissions(roles: Iterable[str], *, superuser: bool = False) -> frozenset[str]:
    """The permissions the given roles grant together (all of them for a superuser)."""
    if superuser:
        return frozenset(PERMISSIONS)
    granted: set[str] = set()
    for role in roles:
        granted |= ROLES.get(role, frozenset())
    return frozenset(granted)


def decide(
    *,
    view_name: str,
    method: str,
    authenticated: bool,
    permissions: frozenset[str],
    is_admin: bool,
    channel: str = "",
    scopes: frozenset[str] | None = None,
) -> Decision:
    """Whether a request may go on.

    `permissions` are the user's (roles, or all for a superuser); `scopes` those of the
    API token that authenticated it, None for a session or an unscoped token;
    `channel` is "dicomweb" for DICOMweb requests.
    """
    needed = required_permission(view_name, method)
    if needed == PUBLIC:
        return Decision(True, PUBLIC)
    if not authenticated:
        return Decision(False, needed or "", "authentication required", status=401)
    rule = rule_for(view_name)
    if needed is None and rule is not None:
        # Every method a view answers is listed, so any other is one it does not have.
        return Decision(False, "", f"method {method.upper()} is not allowed here", status=405)
    if needed is None:
        if is_admin and scopes is None:
            return Decision(True, "")
        return Decision(False, "", NO_RULE)
    if scopes is not None and channel == DICOMWEB and DICOMWEB not in scopes:
        return Decision(False, needed, "this API token is not scoped for DICOMweb")
    if needed == AUTHENTICATED:
        return Decision(True, AUTHENTICATED)
    if needed not in permissions:
        return Decision(False, needed, f"your roles do not grant the {needed!r} permission")
    if scopes is not None and needed not in scopes:
        return Decision(False, needed, f"this API token is not scoped for {needed!r}")
    return Decision(True, needed)
