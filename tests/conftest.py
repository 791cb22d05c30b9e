"""Shared fixtures: real PostgreSQL (embedded by default), real files, temp PRECEDENT_HOME."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("PRECEDENT_DATASETS", REPO_ROOT.parent / "shared" / "datasets"))


def pytest_report_header(config: pytest.Config) -> str:
    """Free disk where tests write (their homes, the embedded PostgreSQL): a full disk
    shows up as every test erroring at once, so the header says how much there was."""
    places = {"tmp": Path(tempfile.gettempdir()), "repo": REPO_ROOT}
    return "free disk: " + ", ".join(
        f"{name} {shutil.disk_usage(path).free / 2**30:.1f} GiB" for name, path in places.items()
    )


@pytest.fixture(autouse=True)
def precedent_home(settings, tmp_path: Path) -> Path:
    """Every test writes its files (DICOM store, caches) into its own folder."""
    home = tmp_path / "home"
    (home / "tmp").mkdir(parents=True)
    settings.PRECEDENT_HOME = home
    settings.FILE_UPLOAD_TEMP_DIR = home / "tmp"
    return home


@pytest.fixture(autouse=True)
def empty_cache():
    """Cached menus and the like must not leak from one test's database into the next."""
    from django.core.cache import cache

    cache.clear()


@pytest.fixture(scope="session")
def datasets() -> Path:
    """../shared/datasets (or PRECEDENT_DATASETS): real files, read in place, never copied."""
    if not DATASETS.is_dir():
        if os.environ.get("PRECEDENT_REQUIRE_DATASETS") == "1":  # CI: a skip would hide most of the suite
            pytest.fail(f"shared datasets not found at {DATASETS} (PRECEDENT_REQUIRE_DATASETS=1)")
        pytest.skip(f"shared datasets not found at {DATASETS}")
    return DATASETS


@pytest.fixture(scope="session")
def dicom_files(datasets: Path) -> Path:
    return datasets / "dicom-test-files"


@pytest.fixture
def user(django_user_model):
    """A radiologist who is also a technologist: reads, searches, acts on the worklist and
    uploads, as the page, REST, DICOMweb and triage tests need. Tests of one role's limits
    make their own users (tests/access)."""
    from access.services import role_grant

    reader = django_user_model.objects.create_user(username="reader", password="a-long-test-password")
    role_grant(user=reader, roles=["radiologist", "technologist"])
    return reader


@pytest.fixture
def api(user) -> APIClient:
    """An API client authenticated with a DRF token, as integrators use it."""
    client = APIClient()
    token = Token.objects.create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


@pytest.fixture
def browser_client(client, user):
    """A Django test client logged in with a session, as the browser pages use it."""
    client.force_login(user)
    return client


@pytest.fixture
def make_dicom(dicom_files: Path):
    """Real DICOM bytes: CT_small.dcm with a fresh SOPInstanceUID and any changes.

    `make_dicom(PatientName="X^Y", StudyInstanceUID=...)` sets header values;
    `make_dicom(transform=fn)` lets a test edit the pydicom Dataset directly.
    """
    from io import BytesIO

    import pydicom
    from pydicom.uid import generate_uid

    def make(transform=None, **changes) -> bytes:
        ds = pydicom.dcmread(dicom_files / "pydicom-test_files" / "CT_small.dcm")
        ds.SOPInstanceUID = generate_uid()
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        if transform is not None:
            transform(ds)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    return make


def upload(name: str, data: bytes):
    """A file object for the API client's multipart encoder."""
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile(name, data, content_type="application/dicom")
