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


def test_a_dicomdir_is_known_by_its_file_meta_too(dicom_files: Path):
    """Copies named otherwise (DICOMDIR-bigEnd) are DICOMDIRs by their File Meta: named
    on the command line they are read; met in a folder they are passed over."""
    folder = dicom_files / "pydicom-test_files" / "dicomdirtests"
    assert "31 stored, 0 duplicate, 0 rejected" in run(str(folder / "DICOMDIR-bigEnd"))
    assert "0 stored, 31 duplicate, 0 rejected" in run(str(folder / "DICOMDIR-implicit"))
    # A record tree pydicom refuses (an image with no patient record above it) still
    # names its files record by record; an empty DICOMDIR says it names none.
    assert "0 stored, 31 duplicate, 0 rejected" in run(str(folder / "DICOMDIR-nopatient"))
    empty = run(str(folder / "DICOMDIR-empty.dcm"))
    assert "the DICOMDIR references no files" in empty and "0 stored, 0 duplicate, 1 rejected" in empty
    # The walk meets every variant and ingests none of them as an instance.
    out = run(str(folder))
    assert "50 stored, 31 duplicate, 0 rejected" in out  # TINY_ALPHA is new; no DICOMDIR rejected


def test_a_dicomdir_naming_a_file_outside_its_folder_is_refused(dicom_files: Path, tmp_path: Path):
    import pydicom

    ds = pydicom.dcmread(dicom_files / "pydicom-test_files" / "dicomdirtests" / "DICOMDIR")
    record = next(r for r in ds.DirectoryRecordSequence if "ReferencedFileID" in r)
    record.ReferencedFileID = ["..", "..", "ETC", "PASSWD"]
    (tmp_path / "cd").mkdir()
    ds.save_as(tmp_path / "cd" / "DICOMDIR")
    out = run(str(tmp_path / "cd" / "DICOMDIR"))
    assert "DICOMDIR references a file outside its folder" in out and "0 stored" in out


def test_folder_is_walked_recursively_skipping_dicomdirs_and_docs(dicom_files: Path):
    folder = dicom_files / "pydicom-test_files" / "dicomdirtests" / "TINY_ALPHA"
    out = run(str(folder))
    assert "50 stored, 0 duplicate, 0 rejected" in out


def test_missing_path_is_a_one_line_error():
    with pytest.raises(CommandError, match="no such file or folder: /nope"):
        run("/nope")


def _connections_to_this_database() -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")
        return cursor.fetchone()[0]


@pytest.mark.django_db(transaction=True)  # the threads' connections must see committed rows
def test_parallel_jobs_store_the_same_and_close_their_connections(dicom_files: Path):
    import pydicom

    from studies.management.commands.ingest import expand
    from studies.models import Series

    tf = dicom_files / "pydicom-test_files"
    folder = tf / "dicomdirtests" / "TINY_ALPHA"
    series = {pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID for f in expand([folder])}
    before = _connections_to_this_database()
    out = run("--jobs", "3", str(tf / "MR_truncated.dcm"), str(folder), str(tf / "CT_small.dcm"))
    assert "51 stored, 0 duplicate, 1 rejected" in out
    assert "MR_truncated.dcm: Pixel Data is 8130 bytes" in out
    assert Instance.objects.count() == 51
    assert set(Series.objects.values_list("series_instance_uid", flat=True)) >= series  # racing series: one row each
    assert Series.objects.count() == len(series) + 1
    assert _connections_to_this_database() == before
    again = run("--jobs", "2", str(tf / "MR_truncated.dcm"), str(folder), str(tf / "CT_small.dcm"))
    assert "0 stored, 51 duplicate, 1 rejected" in again
    with pytest.raises(CommandError, match="--jobs must be at least 1"):
        run("--jobs", "0", str(folder))


@pytest.mark.django_db(transaction=True)  # with --jobs 2 the threads commit on their own connections
@pytest.mark.parametrize("jobs", ["1", "2"])
def test_an_unforeseen_error_on_one_file_does_not_stop_the_walk(dicom_files: Path, monkeypatch, jobs):
    """A bug met on one file (here: made to happen on MR_small) is that file's rejection,
    with the traceback in the log; the other files are still stored and the command
    ends with its summary."""
    from studies.management.commands import ingest

    real = ingest.services._receive

    def failing_on_mr(store, source, name, *, index):
        if name.endswith("MR_small.dcm"):
            raise RuntimeError("something nobody foresaw\nsecond line")
        return real(store, source, name, index=index)

    # Inside the service, so that the batch the two files share fails as a whole first.
    monkeypatch.setattr(ingest.services, "_receive", failing_on_mr)
    tf = dicom_files / "pydicom-test_files"
    out = run("--jobs", jobs, str(tf / "MR_small.dcm"), str(tf / "CT_small.dcm"))
    assert "1 stored, 0 duplicate, 1 rejected" in out
    assert "MR_small.dcm: unexpected error, see the log: RuntimeError: something nobody foresaw\n" in out
    assert Instance.objects.count() == 1
