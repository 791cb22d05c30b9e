"""Exports fixtures: stored real files, model versions and their outputs as rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from studies.models import Instance
from studies.services import instance_ingest

CT = "pydicom-test_files/CT_small.dcm"
STUDY_DIR = "pydicom-test_files/dicomdirtests/98892003"


@pytest.fixture
def ingest():
    def ingest(path: Path) -> Instance:
        result = instance_ingest(source=path)
        assert result.ok, result.reason
        return Instance.objects.select_related("series__study").get(sop_instance_uid=result.sop_instance_uid)

    return ingest


@pytest.fixture
def mr_study(dicom_files, ingest) -> list[Instance]:
    """17 real MR images of one patient (three studies)."""
    return [ingest(path) for path in sorted((dicom_files / STUDY_DIR).glob("*/*")) if path.is_file()]


@pytest.fixture
def ct(dicom_files, ingest) -> Instance:
    return ingest(dicom_files / CT)


@pytest.fixture
def model_version():
    from triage.models import TriageModelVersion

    def make(kind: str, name: str) -> TriageModelVersion:
        return TriageModelVersion.objects.create(
            name=name, kind=kind, architecture="test", weights_path=f"models/triage/{name}.pt", sha256="ab" * 32
        )

    return make
