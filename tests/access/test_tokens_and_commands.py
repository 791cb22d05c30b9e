"""API tokens (plain and scoped), and the roles / api_token commands."""

from __future__ import annotations

import io

import pytest
from django.contrib.auth.models import Group
from django.core.management import CommandError, call_command
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from access.models import AuditEvent, TokenScope
from access.selectors import user_roles

from .conftest import STOW_TYPE, stow_body


def with_key(key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return client


def run(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue().strip(), err.getvalue().strip()


@pytest.mark.django_db
def test_drf_create_token_still_gives_the_users_role_permissions(make_user):
    make_user("technologist", username="tech")
    out, _ = run("drf_create_token", "tech")
    key = Token.objects.get(user__username="tech").key
    assert key in out
    client = with_key(key)
    assert client.get("/api/v1/studies/").status_code == 200
    assert client.post("/api/v1/search/", {}, format="json").status_code == 403


@pytest.mark.django_db
def test_a_scoped_token_is_limited_to_its_scopes_and_refusals_are_audited(make_user, make_dicom):
    make_user("integrator", username="pacs")
    key, _ = run("api_token", "create", "pacs", "--scope", "read", "--scope", "dicomweb")
    assert TokenScope.objects.get(token__key=key).scopes == ["dicomweb", "read"]
    client = with_key(key)
    assert client.get("/dicomweb/studies").status_code == 200
    assert client.get("/api/v1/studies/").status_code == 200
    refused = client.post("/dicomweb/studies", data=stow_body(make_dicom()), content_type=STOW_TYPE)
    assert refused.status_code == 403
    assert refused.json()["error"] == "this API token is not scoped for 'ingest'"
    event = AuditEvent.objects.get(outcome="denied")
    assert (event.username, event.action, event.via, event.details["token_scopes"]) == (
        "pacs",
        "ingest",
        "dicomweb",
        ["dicomweb", "read"],
    )


@pytest.mark.django_db
def test_a_token_without_the_dicomweb_scope_stays_out_of_dicomweb(make_user):
    make_user("integrator", username="pacs")
    key, _ = run("api_token", "create", "pacs", "--scope", "read")
    client = with_key(key)
    assert client.get("/api/v1/studies/").status_code == 200
    refused = client.get("/dicomweb/studies")
    assert (refused.status_code, refused.json()["error"]) == (403, "this API token is not scoped for DICOMweb")


@pytest.mark.django_db
def test_a_scope_beyond_the_role_grants_nothing(make_user):
    make_user("technologist", username="tech")
    key, _ = run("api_token", "create", "tech", "--scope", "search")
    assert with_key(key).post("/api/v1/search/", {}, format="json").status_code == 403


@pytest.mark.django_db
def test_a_new_token_replaces_the_old_and_revoke_removes_it(make_user):
    make_user("integrator", username="pacs")
    first, _ = run("api_token", "create", "pacs")
    second, _ = run("api_token", "create", "pacs", "--scope", "read")
    assert first != second and with_key(first).get("/api/v1/studies/").status_code == 401
    run("api_token", "revoke", "pacs")
    assert with_key(second).get("/api/v1/studies/").status_code == 401
    with pytest.raises(CommandError, match="has no token"):
        run("api_token", "revoke", "pacs")
    actions = list(AuditEvent.objects.filter(via="command").order_by("id").values_list("action", flat=True))
    assert actions == ["token-create", "token-create", "token-revoke"]


@pytest.mark.django_db
def test_api_token_refuses_unknown_users_and_scopes(make_user):
    make_user("integrator", username="pacs")
    with pytest.raises(CommandError, match="no user 'ghost'"):
        run("api_token", "create", "ghost")
    with pytest.raises(CommandError, match="invalid choice"):
        run("api_token", "create", "pacs", "--scope", "everything")
    assert not Token.objects.exists()


@pytest.mark.django_db
def test_roles_grant_revoke_and_list(make_user):
    person = make_user(username="alex")
    out, _ = run("roles", "grant", "alex", "radiologist", "admin")
    assert out == "alex: admin, radiologist"
    person.refresh_from_db()
    assert person.is_staff  # admins use Django's admin site for users
    assert set(Group.objects.get(name="admin").permissions.values_list("codename", flat=True)) >= {
        "change_user",
        "view_auditevent",
    }
    out, _ = run("roles", "revoke", "alex", "admin")
    person.refresh_from_db()
    assert out == "alex: radiologist" and not person.is_staff
    assert user_roles(user=person) == ["radiologist"]
    listing, _ = run("roles", "list")
    assert "radiologist: " in listing and "users: alex" in listing
    mine, _ = run("roles", "list", "alex")
    assert mine.splitlines()[0] == "alex: radiologist" and "search" in mine
    assert AuditEvent.objects.filter(action__in=["role-grant", "role-revoke"], target="alex").count() == 2


@pytest.mark.django_db
def test_roles_refuses_unknown_users_and_roles(make_user):
    make_user(username="alex")
    with pytest.raises(CommandError, match="no user"):
        run("roles", "grant", "ghost", "radiologist")
    with pytest.raises(CommandError, match="invalid choice"):
        run("roles", "grant", "alex", "surgeon")


@pytest.mark.django_db
def test_demo_role_users_get_one_role_each_and_keep_their_password():
    from django.contrib.auth import get_user_model

    from access.services import demo_role_users

    names = demo_role_users(password="first-demo-password")
    assert names == ["demo-radiologist", "demo-technologist", "demo-integrator", "demo-admin"]
    assert demo_role_users(password="second-demo-password") == names
    for name in names:
        person = get_user_model().objects.get(username=name)
        assert user_roles(user=person) == [name.removeprefix("demo-")]
        assert person.check_password("first-demo-password")


@pytest.mark.django_db
def test_token_authentication_loads_roles_and_scopes_in_one_query(make_user, django_assert_num_queries):
    from rest_framework.exceptions import AuthenticationFailed

    from access.authentication import TokenAuthentication
    from access.selectors import token_scopes
    from access.services import api_token_create

    scoped = api_token_create(user=make_user("integrator", "radiologist", username="pacs"), scopes=["read", "ingest"])
    plain = api_token_create(user=make_user(username="root", is_superuser=True))
    auth = TokenAuthentication()
    with django_assert_num_queries(1):
        user, token = auth.authenticate_credentials(scoped.key)
        assert (user.username, user_roles(user=user), token_scopes(token=token)) == (
            "pacs",
            ["integrator", "radiologist"],
            frozenset({"read", "ingest"}),
        )
    with django_assert_num_queries(1):
        user, token = auth.authenticate_credentials(plain.key)
        assert (user_roles(user=user), token_scopes(token=token)) == (["admin"], None)
    user.is_active = False
    user.save()
    for key, reason in ((plain.key, "User inactive or deleted."), ("0" * 40, "Invalid token.")):
        with pytest.raises(AuthenticationFailed, match=reason):
            auth.authenticate_credentials(key)
