"""The policy table covers every URL, and its decisions hold (pure, no database)."""

from __future__ import annotations

import pytest
from django.urls import URLPattern, URLResolver, get_resolver
from rest_framework.views import APIView

from access import policy


def url_patterns(resolver: URLResolver | None = None, namespace: str = "") -> list[tuple[str, URLPattern]]:
    """(view name as resolver_match.view_name spells it, pattern) for every URL pattern."""
    resolver = resolver or get_resolver()
    found = []
    for entry in resolver.url_patterns:
        if isinstance(entry, URLResolver):
            inner = f"{namespace}:{entry.namespace}" if namespace and entry.namespace else entry.namespace or namespace
            found += url_patterns(entry, inner)
        else:
            name = entry.name or f"{entry.callback.__module__}.{entry.callback.__qualname__}"
            found.append((f"{namespace}:{name}" if namespace else name, entry))
    return found


def test_every_url_pattern_has_an_access_rule():
    missing = sorted({name for name, _ in url_patterns() if policy.rule_for(name) is None})
    assert not missing, "URL patterns without an entry in platform/access/policy.py VIEWS: " + ", ".join(missing)


def test_every_method_a_rest_view_answers_is_listed():
    """A DRF view's handler without a table entry would answer 405 from the policy, so an
    endpoint would be unreachable: list each (GET, POST ...) in policy.VIEWS."""
    problems = []
    for name, pattern in url_patterns():
        cls = getattr(pattern.callback, "cls", None)
        rule = policy.rule_for(name)
        if not (isinstance(cls, type) and issubclass(cls, APIView)) or rule is None or "*" in rule:
            continue
        for method in ("get", "post", "put", "patch", "delete"):
            if hasattr(cls, method) and method.upper() not in rule:
                problems.append(f"{name} {method.upper()}")
    assert not problems, "methods answered but not in policy.VIEWS: " + ", ".join(problems)


def test_the_table_names_only_known_permissions():
    known = {*policy.PERMISSIONS, policy.PUBLIC, policy.AUTHENTICATED}
    for name, rule in policy.VIEWS.items():
        assert set(rule.values()) <= known, name
    for role, permissions in policy.ROLES.items():
        assert permissions <= set(policy.PERMISSIONS), role


def test_an_unlisted_view_is_denied_to_all_but_admins():
    everything = frozenset(policy.PERMISSIONS)
    common = dict(view_name="nowhere:new-view", method="GET", authenticated=True)
    denied = policy.decide(**common, permissions=everything - {policy.ADMIN}, is_admin=False)
    assert not denied.allowed and denied.reason == policy.NO_RULE and denied.status == 403
    assert policy.decide(**common, permissions=everything, is_admin=True).allowed
    # ... but not to an admin's token narrowed by scopes.
    assert not policy.decide(**common, permissions=everything, is_admin=True, scopes=frozenset({"read"})).allowed


@pytest.mark.parametrize(
    ("method", "status"),
    [("GET", 200), ("HEAD", 200), ("OPTIONS", 200), ("DELETE", 405), ("PUT", 405)],
)
def test_methods_follow_the_table(method, status):
    decision = policy.decide(
        view_name="api:study-list", method=method, authenticated=True, permissions=frozenset({"read"}), is_admin=False
    )
    assert (decision.allowed, decision.status if not decision.allowed else 200) == (status == 200, status)


def test_roles_and_scopes_combine():
    read_only = frozenset({"read", "dicomweb"})
    integrator = policy.role_permissions([policy.INTEGRATOR])
    stow = dict(view_name="dicomweb:studies", method="POST", authenticated=True, permissions=integrator)
    assert policy.decide(**stow, is_admin=False, channel="dicomweb").allowed
    scoped = policy.decide(**stow, is_admin=False, channel="dicomweb", scopes=read_only)
    assert not scoped.allowed and "not scoped for 'ingest'" in scoped.reason
    no_channel = policy.decide(**stow, is_admin=False, channel="dicomweb", scopes=frozenset({"ingest"}))
    assert not no_channel.allowed and "DICOMweb" in no_channel.reason
    # A scope the roles do not grant adds nothing.
    assert not policy.decide(
        view_name="search-api:feedback",
        method="POST",
        authenticated=True,
        permissions=integrator,
        is_admin=False,
        scopes=frozenset({"feedback"}),
    ).allowed


def test_superusers_hold_every_permission():
    assert policy.role_permissions([], superuser=True) == frozenset(policy.PERMISSIONS)
