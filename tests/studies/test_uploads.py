"""studies.uploads: multipart files spooled into the store as the body is parsed."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import time
from pathlib import Path

import pytest
from django.http.multipartparser import MultiPartParser
from django.middleware.csrf import get_token
from django.test import RequestFactory
from django.test.client import encode_multipart
from rest_framework.test import APIClient

from studies import services
from studies.errors import TooLarge
from studies.models import Instance
from studies.storage import Spooled
from studies.uploads import SpooledUpload, SpoolUploadHandler, ingest_source, spool_uploads
from tests.conftest import upload

pytestmark = pytest.mark.django_db
BOUNDARY = "precedent-test-boundary"


def _parse(body: bytes, store, *, max_bytes: int = 10**9) -> tuple[SpoolUploadHandler, list[SpooledUpload]]:
    handler = SpoolUploadHandler(store=store, max_bytes=max_bytes)
    meta = {"CONTENT_TYPE": f"multipart/form-data; boundary={BOUNDARY}", "CONTENT_LENGTH": str(len(body))}
    _post, files = MultiPartParser(meta, io.BytesIO(body), [handler]).parse()
    return handler, files.getlist("file")


def _spools(home: Path) -> list[Path]:
    return sorted((home / "tmp").glob("*.part"))


def test_each_file_is_a_spool_with_its_hash_and_bytes(make_dicom, precedent_home):
    store = services.dicom_store()
    data = [make_dicom(), make_dicom(), b"not dicom"]
    body = encode_multipart(BOUNDARY, {"file": [upload(f"f{n}.dcm", d) for n, d in enumerate(data)]})
    handler, uploads = _parse(body, store)
    assert [u.name for u in uploads] == ["f0.dcm", "f1.dcm", "f2.dcm"]
    for item, expected in zip(uploads, data, strict=True):
        spooled = item.received
        assert isinstance(spooled, Spooled) and spooled.path.parent == store.tmp
        assert spooled.path.read_bytes() == expected
        assert (spooled.sha256, spooled.size, item.size) == (hashlib.sha256(expected).hexdigest(), *[len(expected)] * 2)
    handler.discard()
    assert _spools(precedent_home) == []


def test_a_file_over_the_limit_is_refused_alone_and_leaves_no_spool(make_dicom, precedent_home):
    small, big = make_dicom(), make_dicom(PatientComments="x" * 5000)
    body = encode_multipart(BOUNDARY, {"file": [upload("big.dcm", big), upload("small.dcm", small)]})
    handler, (over, under) = _parse(body, services.dicom_store(), max_bytes=len(small))
    assert isinstance(over.received, TooLarge) and "upload limit" in str(over.received)
    assert isinstance(under.received, Spooled)
    assert _spools(precedent_home) == [under.received.path]  # the big one's partial spool is gone
    results = services.instances_ingest([(over.received, over.name), (under.received, under.name)])
    assert [r.http_status for r in results] == [413, 201]
    handler.discard()
    assert _spools(precedent_home) == []


def test_a_gzip_wrapped_file_is_unwrapped_when_stored(make_dicom, precedent_home):
    data = make_dicom()
    body = encode_multipart(BOUNDARY, {"file": [upload("ct.dcm.gz", gzip.compress(data))]})
    handler, (item,) = _parse(body, services.dicom_store())
    (result,) = services.instances_ingest([(item.received, item.name)])
    handler.discard()
    assert result.ok, result.reason
    stored = services.dicom_store().path(Instance.objects.get().file_path)
    assert stored.read_bytes() == data
    assert _spools(precedent_home) == []


class _Disconnecting(io.BytesIO):
    """A request body whose client goes away after `after` bytes (the WSGI server then
    raises from its read)."""

    def __init__(self, data: bytes, after: int) -> None:
        super().__init__(data)
        self.after = after

    def read(self, size: int = -1) -> bytes:
        if self.tell() >= self.after:
            raise OSError("client disconnected")
        return super().read(min(size, self.after - self.tell()) if size and size > 0 else self.after - self.tell())


def test_a_client_gone_inside_a_file_leaves_no_spool(make_dicom, precedent_home):
    body = encode_multipart(BOUNDARY, {"file": [upload("a.dcm", make_dicom()), upload("b.dcm", make_dicom())]})
    handler = SpoolUploadHandler(store=services.dicom_store(), max_bytes=10**9)
    meta = {"CONTENT_TYPE": f"multipart/form-data; boundary={BOUNDARY}", "CONTENT_LENGTH": str(len(body))}
    with pytest.raises(OSError, match="client disconnected"):
        MultiPartParser(meta, _Disconnecting(body, int(len(body) * 0.75)), [handler]).parse()
    assert len(_spools(precedent_home)) == 2  # the first file, whole, and the second, cut
    handler.discard()
    assert _spools(precedent_home) == []


def test_the_api_stores_spooled_uploads_and_keeps_no_spool(api, make_dicom, precedent_home):
    files = [upload(f"{n}.dcm", make_dicom()) for n in range(3)] + [upload("junk.dcm", b"junk" * 100)]
    response = api.post("/api/v1/instances/", {"file": files}, format="multipart")
    assert response.status_code == 202, response.json()
    assert [r["status"] for r in response.json()["results"]] == [201, 201, 201, 400]
    assert Instance.objects.count() == 3
    assert list((precedent_home / "tmp").iterdir()) == []


def test_a_session_upload_with_its_csrf_token_in_the_form_is_spooled_too(user, make_dicom, precedent_home):
    """The CSRF check of a browser session reads the form before the view runs: the
    spooling is set up before it, and a refused request leaves no spool either."""
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(user)
    token = get_token(RequestFactory().get("/"))
    client.cookies["csrftoken"] = token
    data = make_dicom()
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    forged = encode_multipart(BOUNDARY, {"csrfmiddlewaretoken": "x" * 32, "file": [upload("a.dcm", data)]})
    response = client.generic("POST", "/api/v1/instances/", forged, content_type=content_type)
    assert response.status_code == 403 and not Instance.objects.exists()
    assert list((precedent_home / "tmp").iterdir()) == []
    body = encode_multipart(BOUNDARY, {"csrfmiddlewaretoken": token, "file": [upload("a.dcm", data)]})
    response = client.generic("POST", "/api/v1/instances/", body, content_type=content_type)
    assert response.status_code == 201, response.content
    assert services.dicom_store().path(Instance.objects.get().file_path).read_bytes() == data
    assert list((precedent_home / "tmp").iterdir()) == []


def test_a_session_that_may_not_ingest_is_refused_before_its_body_is_read(
    django_user_model, make_dicom, monkeypatch, settings
):
    """A radiologist (no ingest permission) posting files from a browser session is
    refused before DRF's CSRF check reads the form, and with it every file; so is any
    body over the limit."""
    from access.services import role_grant
    from studies import uploads

    reader = django_user_model.objects.create_user("reads-only", password="a-long-test-password")
    role_grant(user=reader, roles=["radiologist"])
    spooled = []
    real = uploads.spool_uploads
    monkeypatch.setattr(uploads, "spool_uploads", lambda request: spooled.append(request) or real(request))
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(reader)
    token = get_token(RequestFactory().get("/"))
    client.cookies["csrftoken"] = token
    body = encode_multipart(BOUNDARY, {"csrfmiddlewaretoken": token, "file": [upload("a.dcm", make_dicom())]})
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    response = client.generic("POST", "/api/v1/instances/", body, content_type=content_type)
    assert response.status_code == 403 and "ingest" in response.json()["error"]
    from access.models import AuditEvent

    assert AuditEvent.objects.filter(outcome="denied", user=reader).exists()  # refused, and audited
    settings.PRECEDENT_MAX_UPLOAD_BYTES = 100
    response = client.generic("POST", "/api/v1/instances/", make_dicom(), content_type="application/dicom")
    assert response.status_code == 413 and "error" in response.json()
    assert spooled == [] and not Instance.objects.exists()


def test_a_body_read_already_keeps_djangos_handlers(make_dicom):
    body = encode_multipart(BOUNDARY, {"file": [upload("a.dcm", make_dicom())]})
    request = RequestFactory().generic("POST", "/", body, content_type=f"multipart/form-data; boundary={BOUNDARY}")
    assert request.FILES["file"].name == "a.dcm"  # read by Django's own handlers
    assert spool_uploads(request) is None
    assert not isinstance(request.FILES["file"], SpooledUpload)
    assert ingest_source(request.FILES["file"]) is request.FILES["file"]


def test_a_spool_tells_gzip_from_its_first_two_bytes_however_they_arrive(make_dicom, precedent_home):
    store = services.dicom_store()
    wrapped = gzip.compress(make_dicom())
    for chunks, expected in (([wrapped[:1], wrapped[1:]], True), ([wrapped], True), ([b"\x1f", b"\x00"], False)):
        writer = store.spool_writer()
        for chunk in chunks:
            writer.write(chunk)
        spooled = writer.finish()
        assert spooled.gzip_wrapped is expected
        spooled.discard()
    assert _spools(precedent_home) == []


def test_temp_files_left_by_a_dead_process_are_swept_fresh_ones_kept(precedent_home):
    store = services.dicom_store()
    old, fresh = store.tmp / "left-behind.part", store.tmp / "being-written.part"
    django_temp = store.tmp / "tmpabc.upload.dcm"  # Django's upload temp files share the folder
    for path in (old, fresh, django_temp):
        path.write_bytes(b"x" * 100)
    two_days_ago = time.time() - 2 * 24 * 3600
    for path in (old, django_temp):
        os.utime(path, (two_days_ago, two_days_ago))
    assert store.sweep() == 2
    assert sorted(p.name for p in store.tmp.iterdir()) == ["being-written.part"]


def test_the_app_sweeps_at_start(precedent_home):
    from django.apps import apps

    stale = services.dicom_store().tmp / "stale.part"
    stale.write_bytes(b"x")
    os.utime(stale, (0, 0))
    apps.get_app_config("studies").ready()
    assert not stale.exists()
