"""`manage.py store check`: the files under PRECEDENT_HOME against the Instance rows."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from studies import services
from studies.models import Instance

pytestmark = pytest.mark.django_db

FILES = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm")


@pytest.fixture
def stored(dicom_files: Path) -> list[Instance]:
    instances = []
    for name in FILES:
        result = services.instance_ingest(source=dicom_files / "pydicom-test_files" / name)
        assert result.outcome == services.Outcome.STORED, result.reason
        instances.append(result.instance)
    return instances


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("store", "check", *args, stdout=out)
    return out.getvalue()


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_a_consistent_store_passes(stored, precedent_home: Path) -> None:
    services.instance_render_png(instance=stored[0], request=services.RenderRequest())
    output = run("--deep")
    assert "3 instances" in output and "size and SHA-256" in output
    assert "files missing (instance rows kept): 0" in output and "files no instance has: 0" in output
    assert "previews of files no instance has: 0" in output and "the store matches the database" in output
    assert "previews cached: 1 file," in output and "of 2048 MB (PRECEDENT_RENDER_CACHE_MB)" in output


def test_missing_and_damaged_files_are_reported_and_their_rows_kept(stored, precedent_home: Path) -> None:
    missing, damaged, _ = stored
    (precedent_home / missing.file_path).unlink()
    path = precedent_home / damaged.file_path
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size: only --deep sees it
    path.write_bytes(bytes(data))
    with pytest.raises(CommandError, match="the store and the database disagree"):
        output = io.StringIO()
        call_command("store", "check", "--fix", stdout=output)
    text = output.getvalue()
    assert f"files missing (instance rows kept): 1\n  {missing.sop_instance_uid}" in text
    assert "size or SHA-256 differs from the row (rows kept): 0" in text
    with pytest.raises(CommandError):
        call_command("store", "check", "--deep", stdout=(output := io.StringIO()))
    assert f"(rows kept): 1\n  {damaged.sop_instance_uid}" in output.getvalue()
    assert Instance.objects.count() == 3  # --fix never touches a row


def test_orphans_are_removed_with_fix_once_old_enough(stored, precedent_home: Path, dicom_files: Path) -> None:
    """A file whose row is gone (as when a process dies between placing a file and
    committing its row), an unreadable file, and a preview of a file no row has."""
    gone = stored[0]
    services.instance_render_png(instance=gone, request=services.RenderRequest())
    services.instance_render_png(instance=stored[1], request=services.RenderRequest())
    orphan = precedent_home / gone.file_path
    # The file removal waits for a commit that never comes in a test: the file stays, as
    # when a process dies between placing a file and committing its row.
    Instance.objects.filter(pk=gone.pk).delete()
    assert orphan.exists()
    junk = precedent_home / "dicom" / "ff" / "ee" / ("ffee" + "0" * 60 + ".dcm")
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"not dicom")

    with pytest.raises(CommandError):  # young files: maybe an ingest under way, left alone
        call_command("store", "check", "--fix", stdout=(output := io.StringIO()))
    assert "files no instance has: 2, 0 removed, 2 younger than 60 min left alone" in output.getvalue()
    assert "previews of files no instance has: 0" in output.getvalue()  # young too: left alone
    assert orphan.exists() and junk.exists()

    stale_preview = next((precedent_home / "cache" / "render").rglob(f"{gone.sha256}-*.png"))
    for path in (orphan, junk, stale_preview):
        _age(path, 2 * 3600)
    with pytest.raises(CommandError):  # without --fix: reported, kept
        call_command("store", "check", stdout=(output := io.StringIO()))
    assert "previews of files no instance has: 1 (" in output.getvalue()
    assert orphan.exists() and stale_preview.exists()
    output = run("--fix")
    assert "files no instance has: 2, 2 removed" in output and ", 1 removed" in output.split("previews of")[1]
    assert not stale_preview.exists()
    assert not orphan.exists() and not junk.exists()
    assert len(list((precedent_home / "cache" / "render").rglob("*.png"))) == 1  # stored[1]'s preview stays
    assert "the store matches the database" in run("--deep")


def test_removing_an_orphan_checks_again_under_the_ingest_lock(stored, precedent_home: Path) -> None:
    """Between the shard's listing and the removal an ingest may have committed a row for
    the file: the removal looks again, under that SOP Instance UID's lock, and keeps it."""
    store = services.dicom_store()
    referenced = stored[0]
    assert services._remove_orphan(store, referenced.file_path) is False
    assert (precedent_home / referenced.file_path).exists()
    unreferenced = stored[1]
    Instance.objects.filter(pk=unreferenced.pk).delete()  # its file removal waits for a commit: it stays
    assert services._remove_orphan(store, unreferenced.file_path) is True
    assert not (precedent_home / unreferenced.file_path).exists()


def test_bad_grace_is_a_one_line_error() -> None:
    with pytest.raises(CommandError, match="--grace-minutes must be 0 or more"):
        run("--grace-minutes", "-1")
