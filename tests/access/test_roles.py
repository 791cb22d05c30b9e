"""Each role against pages, REST and DICOMweb: what it must not do is 403 and audited,
what it may do answers 2xx, all decided by the one table in access/policy.py."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from access.models import AuditEvent

from .conftest import STOW_TYPE, stow_body


@dataclass(frozen=True)
class Call:
    door: str  # page, rest, dicomweb
    method: str
    url: str  # formatted with study, series, instance
    body: str = ""  # "", "upload", "stow", "json"


PAGE_UPLOAD = Call("page", "GET", "/upload/")
PAGE_SEARCH = Call("page", "GET", "/search/")
PAGE_STUDIES = Call("page", "GET", "/studies/")
PAGE_MARK_READ = Call("page", "POST", "/worklist/{study}/read/")
PAGE_AUDIT = Call("page", "GET", "/audit/")
REST_UPLOAD = Call("rest", "POST", "/api/v1/instances/", "upload")
REST_STUDIES = Call("rest", "GET", "/api/v1/studies/")
REST_SEARCH = Call("rest", "POST", "/api/v1/search/", "json")
REST_FEEDBACK = Call("rest", "POST", "/api/v1/search/feedback/", "json")
REST_OVERRIDE = Call("rest", "POST", "/api/v1/studies/{study}/triage/", "json")
DW_STOW = Call("dicomweb", "POST", "/dicomweb/studies", "stow")
DW_QIDO = Call("dicomweb", "GET", "/dicomweb/studies?PatientName=Access*")
DW_WADO = Call("dicomweb", "GET", "/dicomweb/studies/{study}/series/{series}/instances/{instance}")

# role → (calls it must not make, calls it may make)
DENIED = {
    "radiologist": [PAGE_UPLOAD, REST_UPLOAD, DW_STOW, PAGE_AUDIT],
    "technologist": [PAGE_SEARCH, REST_SEARCH, DW_WADO, REST_OVERRIDE],
    "integrator": [PAGE_MARK_READ, REST_FEEDBACK, REST_OVERRIDE, PAGE_AUDIT],
    "admin": [PAGE_UPLOAD, REST_SEARCH, DW_STOW],
}
ALLOWED = {
    "radiologist": [PAGE_SEARCH, REST_STUDIES, DW_QIDO, DW_WADO],
    "technologist": [PAGE_UPLOAD, REST_UPLOAD, DW_STOW, DW_QIDO],
    "integrator": [PAGE_STUDIES, REST_STUDIES, REST_UPLOAD, DW_QIDO, DW_STOW],
    "admin": [PAGE_AUDIT, REST_STUDIES, DW_QIDO],
}


def send(call: Call, *, person, ct, session_for, token_for, make_dicom):
    """Pages with a session; REST and DICOMweb with the user's (unscoped) API token."""
    client = session_for(person) if call.door == "page" else token_for(person)
    series = ct.series
    url = call.url.format(
        study=series.study.study_instance_uid, series=series.series_instance_uid, instance=ct.sop_instance_uid
    )
    method = getattr(client, call.method.lower())
    if call.body == "upload":
        return method(url, {"file": SimpleUploadedFile("x.dcm", make_dicom())}, format="multipart")
    if call.body == "stow":
        return method(url, data=stow_body(make_dicom()), content_type=STOW_TYPE)
    if call.body == "json":
        return method(url, {"category": "urgent", "reason": "test"}, format="json")
    return method(url)


def cases(table):
    return [
        pytest.param(role, call, id=f"{role}-{call.door}-{call.method}-{call.url}")
        for role in table
        for call in table[role]
    ]


@pytest.mark.django_db
@pytest.mark.parametrize(("role", "call"), cases(DENIED))
def test_role_is_refused_and_audited(role, call, make_user, ct, session_for, token_for, make_dicom):
    person = make_user(role)
    response = send(call, person=person, ct=ct, session_for=session_for, token_for=token_for, make_dicom=make_dicom)
    assert response.status_code == 403, response.content[:300]
    if call.door == "page":
        assert b"Not allowed" in response.content and b"permission" in response.content
    else:
        assert "permission" in response.json()["error"]
    event = AuditEvent.objects.filter(outcome="denied").get()
    assert (event.username, event.roles, event.via, event.method, event.status_code) == (
        person.username,
        [role],
        call.door,
        call.method,
        403,
    )
    assert "do not grant" in event.details["reason"]
    assert event.path.split("?")[0] == response.wsgi_request.path


@pytest.mark.django_db
@pytest.mark.parametrize(("role", "call"), cases(ALLOWED))
def test_role_may(role, call, make_user, ct, session_for, token_for, make_dicom):
    person = make_user(role)
    response = send(call, person=person, ct=ct, session_for=session_for, token_for=token_for, make_dicom=make_dicom)
    assert 200 <= response.status_code < 300, response.content[:300]
    assert not AuditEvent.objects.filter(outcome="denied").exists()


@pytest.mark.django_db
def test_the_home_page_is_the_worklist_for_those_who_read_from_it(make_user, session_for):
    # Every role reads the worklist; the study list has moved to /studies/.
    for role in ("radiologist", "technologist", "integrator", "admin"):
        response = session_for(make_user(role)).get("/")
        assert (response.status_code, response["Location"]) == (302, "/worklist/"), role
    assert session_for(make_user("radiologist", username="second")).get("/studies/").status_code == 200


@pytest.mark.django_db
def test_a_user_without_roles_may_do_nothing_but_log_out(make_user, session_for, token_for):
    nobody = make_user()
    assert session_for(nobody).get("/").status_code == 403
    assert token_for(nobody).get("/api/v1/studies/").status_code == 403
    assert token_for(nobody).get("/dicomweb/studies").status_code == 403
    assert session_for(nobody).post("/logout/").status_code == 302


@pytest.mark.django_db
def test_anonymous_requests_keep_their_answers(client):
    """No login: pages redirect to it, REST and DICOMweb answer 401 (audited), the schema is public."""
    assert client.get("/audit/").status_code == 302
    assert client.get("/api/v1/studies/").status_code == 401
    assert client.get("/dicomweb/studies").status_code == 401
    assert client.get("/api/v1/schema/").status_code == 200
    assert AuditEvent.objects.filter(outcome="denied", status_code=401).count() == 2


@pytest.mark.django_db
def test_superusers_are_admins_with_every_permission(django_user_model, session_for, token_for):
    root = django_user_model.objects.create_superuser("root", "root@example.org", "a-long-test-password")
    assert session_for(root).get("/upload/").status_code == 200
    assert session_for(root).get("/audit/").status_code == 200
    assert token_for(root).get("/dicomweb/studies").status_code == 200


@pytest.mark.django_db
def test_a_method_the_view_lacks_is_405_not_403(make_user, session_for, token_for):
    person = make_user("radiologist")
    assert session_for(person).post("/").status_code == 405
    assert token_for(person).delete("/api/v1/studies/").status_code == 405


@pytest.mark.django_db
def test_the_audit_and_calibration_links_are_in_the_nav_for_admins_only(make_user, session_for):
    admin = session_for(make_user("admin")).get("/studies/")
    reader = session_for(make_user("radiologist")).get("/studies/")
    for link in (b'href="/audit/"', b'href="/worklist/calibration/"'):
        assert link in admin.content
        assert link not in reader.content


@pytest.mark.django_db
def test_the_nav_offers_only_what_the_role_may_open(make_user, session_for):
    pages = {
        role: session_for(make_user(role)).get("/studies/").content.decode() for role in ("technologist", "radiologist")
    }

    def nav(role: str) -> str:
        return pages[role].split('<nav aria-label="Main">')[1].split("</nav>")[0]

    technologist, radiologist = nav("technologist"), nav("radiologist")
    assert 'href="/upload/"' in technologist and 'href="/search/"' not in technologist
    # The brand leads home: the worklist, for those who read from it.
    assert '<a class="brand" href="/worklist/">' in pages["radiologist"]
    assert 'href="/search/"' in radiologist and 'href="/upload/"' not in radiologist


@pytest.mark.django_db
def test_a_refused_form_post_is_answered_before_its_body_is_read(make_user, monkeypatch, settings):
    """The CSRF check of a form POST reads the whole body, every uploaded file, to find
    its token: the login and access checks refuse first, so an anonymous visitor or a
    user without the permission cannot make the server read (and spool) an upload."""
    from django.core.files.uploadedfile import SimpleUploadedFile
    from django.http import multipartparser
    from django.middleware.csrf import get_token
    from django.test import Client, RequestFactory

    parsed = []
    real = multipartparser.MultiPartParser.parse
    monkeypatch.setattr(multipartparser.MultiPartParser, "parse", lambda self: parsed.append(1) or real(self))

    def post(person=None, size=4096):
        client = Client(enforce_csrf_checks=True)
        if person is not None:
            client.force_login(person)
        token = get_token(RequestFactory().get("/"))
        client.cookies["csrftoken"] = token
        upload = SimpleUploadedFile("q.png", b"\x89PNG" + b"x" * size, content_type="image/png")
        return client.post("/search/", {"csrfmiddlewaretoken": token, "file": upload})

    anonymous = post()
    assert anonymous.status_code == 302 and "/login/" in anonymous["Location"] and parsed == []
    assert post(make_user("technologist")).status_code == 403 and parsed == []  # no search permission
    # Allowed, the form is read (and its CSRF token checked) as before, up to the limit.
    radiologist = make_user("radiologist")
    assert post(radiologist).status_code in (200, 400) and parsed
    parsed.clear()
    settings.PRECEDENT_MAX_UPLOAD_BYTES = 1024  # a multipart body may be 1 MiB over it, for framing
    too_large = post(radiologist, size=(1 << 20) + 8192)
    assert too_large.status_code == 413 and b"over the upload limit" in too_large.content and parsed == []
