"""Shared fixtures: real PostgreSQL (embedded by default), real files, temp PRECEDENT_HOME."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("PRECEDENT_DATASETS", REPO_ROOT.parent / "shared" / "datasets"))


@pytest.fixture(autouse=True)
def precedent_home(settings, tmp_path: Path) -> Path:
    """Every test writes its files (DICOM store, caches) into its own folder."""
    home = tmp_path / "home"
    (home / "tmp").mkdir(parents=True)
    settings.PRECEDENT_HOME = home
    settings.FILE_UPLOAD_TEMP_DIR = home / "tmp"
    return home


@pytest.fixture(scope="session")
def datasets() -> Path:
    """../shared/datasets (or PRECEDENT_DATASETS): real files, read in place, never copied."""
    if not DATASETS.is_dir():
        pytest.skip(f"shared datasets not found at {DATASETS}")
    return DATASETS


@pytest.fixture(scope="session")
def dicom_files(datasets: Path) -> Path:
    return datasets / "dicom-test-files"


@pytest.fixture
def user(django_user_model):
    return django_user_model.objects.create_user(username="reader", password="a-long-test-password")


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
