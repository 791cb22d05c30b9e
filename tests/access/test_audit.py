"""The audit log: what each door writes, that the database keeps it append-only, and
how admins read it (page, admin site, CSV)."""

from __future__ import annotations

import csv
import datetime as dt
import io

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.db import DatabaseError, connection, transaction

from access.models import AppendOnlyError, AuditEvent
from access.services import audit_record
from studies.models import Instance

from .conftest import PASSWORD, STOW_TYPE, stow_body


@pytest.fixture
def reader(make_user):
    return make_user("radiologist", "technologist", username="reader")


def only(**filters) -> AuditEvent:
    return AuditEvent.objects.filter(**filters).get()


@pytest.mark.django_db
def test_a_study_page_view_is_audited_with_who_what_and_where(reader, session_for, ct):
    study = ct.series.study.study_instance_uid
    response = session_for(reader).get(f"/studies/{study}/", REMOTE_ADDR="10.1.2.3")
    assert response.status_code == 200
    event = only(action="view")
    assert (event.username, event.user_id, event.via, event.target_type, event.target) == (
        "reader",
        reader.pk,
        "page",
        "study",
        study,
    )
    assert (event.remote_addr, event.method, event.status_code, event.outcome) == ("10.1.2.3", "GET", 200, "ok")
    assert event.roles == ["radiologist", "technologist"]
    assert event.details["permission"] == "read"


@pytest.mark.django_db
def test_searches_downloads_and_changes_are_audited(reader, token_for, session_for, ct):
    api = token_for(reader)
    study = ct.series.study.study_instance_uid
    assert api.get("/dicomweb/studies", {"PatientName": "Access*"}).status_code == 200
    search = only(action="search")
    assert (search.via, search.details["query"]) == ("dicomweb", {"PatientName": "Access*"})

    assert api.get(f"/api/v1/instances/{ct.sop_instance_uid}/file").status_code == 200
    download = only(action="download")
    assert (download.via, download.target_type, download.target) == ("rest", "instance", ct.sop_instance_uid)

    assert session_for(reader).post(f"/worklist/{study}/read/").status_code in (200, 204, 302)
    change = only(action="change")
    assert (change.method, change.target_type, change.target) == ("POST", "study", study)


@pytest.mark.django_db
def test_an_upload_is_audited_with_what_it_stored(reader, token_for, make_dicom):
    data = make_dicom()
    response = token_for(reader).post(
        "/api/v1/instances/", {"file": SimpleUploadedFile("a.dcm", data)}, format="multipart"
    )
    assert response.status_code == 201
    event = only(action="ingest")
    stored = response.json()["results"][0]
    assert (event.target_type, event.target) == ("study", stored["study_instance_uid"])
    assert event.details["stored"] == 1 and event.details["instances"] == [stored["sop_instance_uid"]]


@pytest.mark.django_db
def test_a_stow_rs_store_is_audited_with_what_it_stored(make_user, token_for, make_dicom):
    data = make_dicom()
    response = token_for(make_user("integrator")).generic(
        "POST", "/dicomweb/studies", stow_body(data), content_type=STOW_TYPE
    )
    assert response.status_code == 200
    event = only(action="ingest")
    stored = Instance.objects.get()
    assert (event.via, event.target_type, event.target) == ("dicomweb", "study", stored.series.study.study_instance_uid)
    assert event.details["stored"] == 1 and event.details["rejected"] == 0
    assert event.details["instances"] == [stored.sop_instance_uid]


@pytest.mark.django_db
def test_thumbnails_and_static_files_are_not_audited(reader, session_for, ct):
    client = session_for(reader)
    before = AuditEvent.objects.count()
    assert client.get(f"/api/v1/instances/{ct.sop_instance_uid}/thumbnail.png").status_code == 200
    client.get("/static/css/precedent.css")
    assert AuditEvent.objects.count() == before


@pytest.mark.django_db
def test_logins_logouts_and_failed_logins_are_audited(reader, client):
    assert client.post("/login/", {"username": "reader", "password": "wrong"}).status_code == 200
    assert client.post("/login/", {"username": "reader", "password": PASSWORD}).status_code == 302
    assert client.post("/logout/").status_code == 302
    rows = list(AuditEvent.objects.order_by("id").values_list("action", "outcome", "target"))
    assert rows == [("login", "denied", "reader"), ("login", "ok", "reader"), ("logout", "ok", "reader")]


@pytest.mark.django_db
def test_the_orm_refuses_to_change_or_delete_an_event():
    event = audit_record(action="view", target_type="study", target="1.2.3")
    event.action = "nothing"
    with pytest.raises(AppendOnlyError):
        event.save()
    with pytest.raises(AppendOnlyError):
        event.delete()
    with pytest.raises(AppendOnlyError):
        AuditEvent.objects.filter(pk=event.pk).update(action="nothing")
    with pytest.raises(AppendOnlyError):
        AuditEvent.objects.all().delete()


@pytest.mark.django_db
@pytest.mark.parametrize(
    "sql",
    ["UPDATE access_auditevent SET action = 'nothing'", "DELETE FROM access_auditevent"],
    ids=["update", "delete"],
)
def test_the_database_refuses_raw_update_and_delete(sql):
    event = audit_record(action="view", target_type="study", target="1.2.3")
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(sql)
    event = AuditEvent.objects.get(pk=event.pk)
    assert (event.action, event.target) == ("view", "1.2.3")


@pytest.mark.django_db
def test_deleting_a_user_keeps_their_history(make_user, session_for):
    person = make_user("radiologist", username="leaver")
    session_for(person).get("/studies/")
    pk = person.pk
    person.delete()  # no cascade, no refused update: the row stays as written
    event = only(action="list")
    assert (event.username, event.user_id) == ("leaver", pk)


# --- reading it ------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_audit_page_filters_and_paginates(make_user, session_for):
    admin = session_for(make_user("admin", username="auditor"))
    for number in range(55):
        audit_record(action="view", target_type="study", target=f"1.2.{number}", username="someone")
    audit_record(action="download", target_type="instance", target="9.9.9")
    first = admin.get("/audit/")
    assert first.status_code == 200
    assert b"1\xe2\x80\x9350 of 5" in first.content and b'rel="next"' in first.content
    filtered = admin.get("/audit/", {"action": "download"})
    assert b"9.9.9" in filtered.content and b"1.2.3<" not in filtered.content
    assert b"1\xe2\x80\x931 of 1 event" in filtered.content
    by_user = admin.get("/audit/", {"user": "someone", "page": 2})
    assert b"51\xe2\x80\x9355 of 55" in by_user.content
    tomorrow = (dt.date.today() + dt.timedelta(days=2)).isoformat()
    assert b"No events match" in admin.get("/audit/", {"date_from": tomorrow}).content
    assert b"(ignored)" in admin.get("/audit/", {"date_from": "not-a-date"}).content


@pytest.mark.django_db
def test_the_csv_export_holds_the_filtered_events(make_user, session_for):
    admin = session_for(make_user("admin", username="auditor"))
    audit_record(action="view", target_type="study", target="1.2.3", details={"k": 1})
    audit_record(action="search", target='=HYPERLINK("http://x")')
    response = admin.get("/audit/export.csv", {"action": "view"})
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert [(row["action"], row["target_type"], row["target"], row["details"]) for row in rows] == [
        ("view", "study", "1.2.3", '{"k": 1}')
    ]
    everything = admin.get("/audit/export.csv")
    text = b"".join(everything.streaming_content).decode()
    assert "'=HYPERLINK" in text  # a formula is neutralised for spreadsheets
    # Reading the log and exporting it are themselves audited.
    assert AuditEvent.objects.filter(action="export", username="auditor").count() == 2


@pytest.mark.django_db
def test_audit_export_command(tmp_path):
    audit_record(action="view", target_type="study", target="1.2.3")
    out = tmp_path / "audit.csv"
    call_command("audit_export", "--since", dt.date.today().isoformat(), "--out", str(out))
    rows = list(csv.DictReader(out.open()))
    assert [(row["action"], row["target"]) for row in rows] == [("view", "1.2.3")]
    later = (dt.date.today() + dt.timedelta(days=1)).isoformat()
    call_command("audit_export", "--since", later, "--out", str(out))
    assert list(csv.DictReader(out.open())) == []
    assert AuditEvent.objects.filter(action="export", via="command").count() == 2


@pytest.mark.django_db
def test_audit_export_command_refuses_bad_input(tmp_path):
    from django.core.management import CommandError

    with pytest.raises(CommandError, match="not a date"):
        call_command("audit_export", "--since", "yesterday", "--out", str(tmp_path / "a.csv"))
    with pytest.raises(CommandError, match="no such folder"):
        call_command("audit_export", "--out", str(tmp_path / "missing" / "a.csv"))
    assert list(tmp_path.glob("**/*.csv*")) == []


@pytest.mark.django_db
def test_the_admin_site_shows_events_read_only(make_user, session_for):
    event = audit_record(action="view", target_type="study", target="1.2.3")
    admin = session_for(make_user("admin", username="auditor"))
    assert admin.get("/admin/access/auditevent/").status_code == 200
    assert admin.get(f"/admin/access/auditevent/{event.pk}/change/").status_code == 200
    assert admin.get("/admin/access/auditevent/add/").status_code == 403
    assert admin.post(f"/admin/access/auditevent/{event.pk}/delete/", {"post": "yes"}).status_code == 403
    assert AuditEvent.objects.filter(pk=event.pk).exists()


@pytest.mark.django_db
def test_a_view_that_audits_itself_gets_no_second_row(reader, ct):
    """Exports write their own, richer row with audit_record(request=...): the middleware
    then adds none for that request."""
    from django.http import HttpResponse
    from django.test import RequestFactory
    from django.urls import resolve

    from access.middleware import audit_response

    url = f"/studies/{ct.series.study.study_instance_uid}/"
    request = RequestFactory().get(url)
    request.user = reader
    request.resolver_match = resolve(url)
    audit_response(request, HttpResponse())
    assert AuditEvent.objects.filter(action="view").count() == 1
    audit_record(action="export", request=request, target_type="study", target="x")
    audit_response(request, HttpResponse())
    assert AuditEvent.objects.filter(action="view").count() == 1
