"""DICOMweb fixtures: a live server, a dicomweb-client with a DRF token, real files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client import DICOMwebClient
from rest_framework.authtoken.models import Token

CT = "pydicom-test_files/CT_small.dcm"
MR = "pydicom-test_files/MR_small.dcm"
MULTIFRAME = "pydicom-data/emri_small.dcm"  # Enhanced MR, 10 frames, native
J2K = "pydicom-test_files/JPEG2000.dcm"  # JPEG 2000, 1024×256
REPORT = "pydicom-test_files/test-SR.dcm"  # no pixel data
BROKEN = "pydicom-test_files/MR_truncated.dcm"  # pixel data cut short


@pytest.fixture
def token(user) -> str:
    return Token.objects.create(user=user).key


@pytest.fixture
def base_url(live_server) -> str:
    return f"{live_server.url}/dicomweb"


@pytest.fixture
def http() -> Iterator[requests.Session]:
    """An HTTP session closed after the test: a kept-alive connection would keep a live
    server thread, and its database connection, past the end of the test run."""
    with requests.Session() as session:
        yield session


@pytest.fixture
def dw(base_url, token, http) -> DICOMwebClient:
    """dicomweb-client as an integrator uses it, authenticated with a DRF token."""
    return DICOMwebClient(url=base_url, session=http, headers={"Authorization": f"Token {token}"})


@pytest.fixture
def auth(token) -> dict[str, str]:
    return {"Authorization": f"Token {token}"}


@pytest.fixture
def read(dicom_files: Path):
    """A test file as a pydicom Dataset (what dicomweb-client's store_instances takes)."""

    def read(name: str) -> pydicom.Dataset:
        return pydicom.dcmread(dicom_files / name)

    return read


@pytest.fixture
def stored(dw, read):
    """CT, MR, the multi-frame MR and the JPEG 2000 file stored over STOW-RS."""
    datasets = {name: read(name) for name in (CT, MR, MULTIFRAME, J2K)}
    dw.store_instances(list(datasets.values()))
    return datasets
