"""The REST and DICOMweb side of the access policy: DRF's default permission class.

DRF authenticates inside the view (token or session), after every middleware's
process_view has run, so the middleware leaves DRF views to this class; both decide
with `access.enforce.check_request` over the same table (policy.py).
"""

from __future__ import annotations

from rest_framework.exceptions import MethodNotAllowed
from rest_framework.permissions import BasePermission

from .enforce import check_request


class PolicyPermission(BasePermission):
    """Allows what policy.py allows the request's user (and token scopes); the refusal's
    reason becomes the 403's `{"error": ...}` and the audit row's reason."""

    message = "not allowed"

    def has_permission(self, request, view) -> bool:
        decision = check_request(request._request, user=request.user, token=request.auth)
        if decision.allowed:
            return True
        if decision.status == 405:
            raise MethodNotAllowed(request.method)
        # 401 vs 403 is DRF's call: no credentials at all answers 401 (NotAuthenticated).
        self.message = decision.reason
        return False
