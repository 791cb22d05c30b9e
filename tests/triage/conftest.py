"""Triage fixtures: real mammogram pixels (a MIAS film) in MG DICOM files, ingested
through the same service as any upload so the triage job runs on arrival (inline)."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from studies import services as study_services
from studies.datasets.base import DIGITAL_MAMMOGRAPHY_FOR_PRESENTATION, encode, image_dataset
from studies.models import Instance
from studies.services import Outcome
from tests.browser import conftest as browser

# The headless Chromium page of the browser tests, for the worklist's live behaviour.
browser_page = browser.browser_page


@pytest.fixture
def admin(django_user_model):
    """An admin by role (the access policy's ADMIN permission), not by the staff flag."""
    from access.services import role_grant

    chief = django_user_model.objects.create_user(username="chief", password="a-long-test-password")
    role_grant(user=chief, roles=["admin"])
    return chief


@pytest.fixture
def pair(datasets: Path):
    """Cohort "pair": two MIAS patients, p001 (two films, benign masses) and p002 (two normal films)."""
    from django.core.management import call_command

    from studies.models import Cohort

    call_command(
        "import_dataset", "mias", str(datasets / "mini-mias"), "--limit", "4", "--cohort", "pair", stdout=io.StringIO()
    )
    return Cohort.objects.get(name="pair")


@pytest.fixture(scope="session")
def film(datasets: Path) -> np.ndarray:
    """A real digitised film mammogram (MIAS mdb001, 1024², 8 bit)."""
    with Image.open(datasets / "mini-mias" / "images" / "mdb001.png") as image:
        return np.asarray(image.convert("L"))


@pytest.fixture
def mammogram(film: np.ndarray) -> Callable[..., bytes]:
    """MG DICOM bytes: the film (or `pixels`) with fresh UIDs and any header changes.

    `transform` edits the pydicom Dataset before it is written."""

    def make(
        pixels: np.ndarray | None = None,
        *,
        study_uid: str | None = None,
        patient_id: str = "TRIAGE-1",
        transform: Callable[[pydicom.Dataset], None] | None = None,
        **attributes: object,
    ) -> bytes:
        header = {
            "PatientID": patient_id,
            "PatientName": f"Triage^{patient_id}",
            "StudyDate": "20240105",
            "StudyDescription": "Screening mammogram",
            "Modality": "MG",
            "BodyPartExamined": "BREAST",
            "ImageLaterality": "L",
            "ViewPosition": "MLO",
            "SeriesNumber": 1,
            "InstanceNumber": 1,
        }
        header.update(attributes)
        ds = image_dataset(
            film if pixels is None else pixels,
            sop_class_uid=DIGITAL_MAMMOGRAPHY_FOR_PRESENTATION,
            sop_instance_uid=generate_uid(),
            study_instance_uid=study_uid or generate_uid(),
            series_instance_uid=generate_uid(),
            **header,
        )
        if transform is not None:
            transform(ds)
        return encode(ds)

    return make


@pytest.fixture
def ingest(django_capture_on_commit_callbacks) -> Callable[[bytes], Instance]:
    """Store DICOM bytes as an upload would, running the on-commit jobs (triage) too."""

    def store(data: bytes) -> Instance:
        with django_capture_on_commit_callbacks(execute=True):
            result = study_services.instance_ingest(source=io.BytesIO(data), name="test.dcm")
        assert result.outcome == Outcome.STORED, result.reason
        return result.instance

    return store
