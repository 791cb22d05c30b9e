"""Users of one role each, clients for every door, and a stored CT study."""

from __future__ import annotations

from collections.abc import Callable
from io import BytesIO

import pytest
from django.test import Client
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from access.services import api_token_create, role_grant

# The running C-STORE listener of the dimse tests, for the listener's audit rows.
from tests.dimse.conftest import listener, start_listener  # noqa: F401

PASSWORD = "a-long-test-password"


@pytest.fixture
def make_user(django_user_model) -> Callable[..., object]:
    def make(*roles: str, username: str | None = None, **fields):
        person = django_user_model.objects.create_user(
            username=username or "-".join(roles) or "nobody", password=PASSWORD, **fields
        )
        if roles:
            role_grant(user=person, roles=roles)
        return person

    return make


@pytest.fixture
def session_for() -> Callable[[object], Client]:
    """A browser-like client logged in as the given user."""

    def session(person) -> Client:
        client = Client()
        client.force_login(person)
        return client

    return session


@pytest.fixture
def token_for() -> Callable[..., APIClient]:
    """An API client with a token of the given user (narrowed to `scopes` when given)."""

    def token(person, *scopes: str) -> APIClient:
        if scopes:
            key = api_token_create(user=person, scopes=scopes).key
        else:
            key = Token.objects.get_or_create(user=person)[0].key
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
        return client

    return token


@pytest.fixture
def ct(make_dicom):
    """One stored CT instance (ingested straight through the service)."""
    from studies.models import Instance
    from studies.services import instance_ingest

    result = instance_ingest(source=BytesIO(make_dicom(PatientName="Access^Test")), name="ct.dcm")
    return Instance.objects.select_related("series__study").get(sop_instance_uid=result.sop_instance_uid)


STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=access-test'


def stow_body(data: bytes) -> bytes:
    return b"--access-test\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n--access-test--\r\n"
