"""manage.py ingest: files, folders, DICOMDIR, summary and reasons."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from studies.models import Instance

pytestmark = pytest.mark.django_db


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("ingest", *args, stdout=out, verbosity=0)
    return out.getvalue()


def test_files_and_summary(dicom_files: Path):
    tf = dicom_files / "pydicom-test_files"
    out = run(str(tf / "CT_small.dcm"), str(tf / "MR_small.dcm"), str(tf / "MR_truncated.dcm"))
    assert "2 stored, 0 duplicate, 1 rejected" in out
    assert "MR_truncated.dcm: Pixel Data is 8130 bytes" in out
    assert "0 stored, 2 duplicate, 0 rejected" in run(str(tf / "CT_small.dcm"), str(tf / "MR_small.dcm"))


def test_dicomdir_ingests_what_it_references(dicom_files: Path):
    out = run(str(dicom_files / "pydicom-test_files" / "dicomdirtests" / "DICOMDIR"))
    assert "31 stored, 0 duplicate, 0 rejected" in out
    assert Instance.objects.count() == 31


def test_folder_is_walked_recursively_skipping_dicomdirs_and_docs(dicom_files: Path):
    folder = dicom_files / "pydicom-test_files" / "dicomdirtests" / "TINY_ALPHA"
    out = run(str(folder))
    assert "50 stored, 0 duplicate, 0 rejected" in out


def test_missing_path_is_a_one_line_error():
    with pytest.raises(CommandError, match="no such file or folder: /nope"):
        run("/nope")
