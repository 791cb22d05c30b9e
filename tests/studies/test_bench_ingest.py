"""`manage.py bench_ingest`: figures for every path, and nothing left behind.

No timing thresholds here (the machines are shared and noisy): the tests check that
each configuration stored every instance, that the figures are consistent, and that
the benchmark's rows, files, user and temp folders are gone afterwards.
"""

from __future__ import annotations

import json
import pstats
import re
from io import StringIO
from pathlib import Path

import dj_database_url
import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import connection

from precedent.db import connection_url
from studies import bench, dicom
from studies.management.commands.bench_ingest import ORTHANC_BINARY
from studies.models import Instance, Patient, Study


def _run(tmp_path: Path, *args: str) -> tuple[dict, str]:
    out = StringIO()
    target = tmp_path / "figures.json"
    call_command("bench_ingest", "--json", str(target), *args, stdout=out)
    return json.loads(target.read_text()), out.getvalue()


def _assert_figures(result: dict, n: int) -> None:
    assert result["instances"] == n
    assert result["errors"] == 0
    assert result["bytes"] > 0
    assert result["seconds"] > 0
    assert result["instances_per_s"] > 0
    assert result["mb_per_s"] > 0
    assert 0 < result["p50_ms"] <= result["p99_ms"]


def _assert_nothing_left(home: Path) -> None:
    assert not Patient.objects.filter(patient_id__startswith=bench.BENCH_PATIENT_PREFIX).exists()
    assert not Study.objects.exists()
    assert not Instance.objects.exists()
    assert not get_user_model().objects.filter(username__startswith="bench-ingest-").exists()
    assert not list((home / "dicom").rglob("*.dcm")), "files of deleted instances remain"
    assert not list((home / "bench").glob("run-*")), "the run's temp folder (gunicorn log, Orthanc storage) remains"


# --- pure helpers ---------------------------------------------------------------------


def test_synthetic_instances_are_valid_fresh_and_grouped(tmp_path):
    files = bench.make_instances(bench.KINDS["dx"], 3, tag="t", label="x") + bench.make_instances(
        bench.KINDS["ct"], 2, tag="t", label="x"
    )
    headers = []
    for file in files:
        path = tmp_path / file.name
        path.write_bytes(file.data)
        _, header = dicom.read_header(path)
        headers.append(header)
    dx, ct = headers[:3], headers[3:]
    assert {h.sop_class_uid for h in dx} == {bench.DX_FOR_PRESENTATION}
    assert {h.sop_class_uid for h in ct} == {bench.CT_IMAGE_STORAGE}
    assert (dx[0].rows, dx[0].columns, ct[0].rows, ct[0].columns) == (2500, 2048, 512, 512)
    assert 10_000_000 < files[0].size < 10_500_000 and 500_000 < files[3].size < 600_000
    assert len({h.sop_instance_uid for h in headers}) == 5
    # DX: two one-image series (PA, LAT) per study; the third film opens a new study.
    assert dx[0].study_instance_uid == dx[1].study_instance_uid != dx[2].study_instance_uid
    assert dx[0].series_instance_uid != dx[1].series_instance_uid
    assert [h.view_position for h in dx] == ["PA", "LAT", "PA"]
    assert ct[0].series_instance_uid == ct[1].series_instance_uid
    assert all(h.patient_id.startswith(f"{bench.BENCH_PATIENT_PREFIX}t-") for h in headers)
    assert files[3].data != files[4].data


def test_batches_are_multipart_bodies_that_count_their_files():
    import io

    from django.core.files.uploadhandler import MemoryFileUploadHandler
    from django.http.multipartparser import MultiPartParser

    files = bench.make_instances(bench.KINDS["ct"], 5, tag="t", label="b")
    groups = bench.batches(files, 2)
    assert [g.count for g in groups] == [2, 2, 1]
    assert [g.size for g in groups] == [files[0].size + files[1].size, files[2].size + files[3].size, files[4].size]
    # What Django's parser reads back from the first body: its two files, byte for byte.
    body = groups[0].data
    meta = {
        "CONTENT_TYPE": f"multipart/form-data; boundary={bench.MultipartUpload.boundary}",
        "CONTENT_LENGTH": str(len(body)),
    }
    _, uploads = MultiPartParser(meta, io.BytesIO(body), [MemoryFileUploadHandler()]).parse()
    assert [u.read() for u in uploads.getlist("file")] == [files[0].data, files[1].data]


def test_figures_and_table():
    figures = bench.Figures("ct", "rest", 4, instances=4, bytes=2_000_000, seconds=0.5, latencies_ms=[1, 2, 3, 100])
    assert figures.instances_per_s == 8
    assert figures.mb_per_s == 4
    assert figures.p50_ms == 2.5
    assert 90 < figures.p99_ms <= 100
    orthanc = bench.Figures("ct", "orthanc", 4, instances=4, bytes=2_000_000, seconds=0.25, latencies_ms=[1])
    table = bench.format_table([figures, orthanc])
    assert table.splitlines()[0].startswith("| kind | path")
    assert len(table.splitlines()) == 4
    assert bench.ratios([figures, orthanc]) == ["ct × 4 client(s): rest 8.0/s vs orthanc 16.0/s = 0.50×"]


def test_the_median_round_is_reported_unless_a_round_failed():
    def round_(seconds: float, errors: int = 0) -> bench.Figures:
        return bench.Figures("ct", "rest", 1, instances=10, seconds=seconds, errors=errors, latencies_ms=[1.0])

    rounds = [round_(1.0), round_(0.5), round_(2.0)]
    chosen = bench.median_round(rounds)
    assert chosen is rounds[0] and chosen.round_rates == [10, 20, 5]
    assert "| 10 / 20 / 5 " in bench.format_table([chosen])
    assert bench.median_round([round_(1.0), round_(0.5)]).instances_per_s == 10  # the lower middle one
    assert bench.median_round([round_(1.0), round_(0.5, errors=1), round_(2.0)]).errors == 1


def test_database_url_points_at_this_database(db):
    parsed = dj_database_url.parse(connection_url())
    params = connection.get_connection_params()
    assert parsed["NAME"] == connection.settings_dict["NAME"]
    assert (parsed["HOST"] or parsed["OPTIONS"].get("host")) == params["host"]


# --- the command ----------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_service_and_rest_paths(tmp_path, precedent_home):
    """The REST path runs a real gunicorn on the test database (hence committed rows)."""
    figures, output = _run(
        tmp_path, "--n", "3", "--kinds", "ct", "--clients", "1", "2", "--warmup", "1", "--no-orthanc", "--profile",
        str(tmp_path / "prof"), "--rounds", "2", "--batch-size", "2",
    )  # fmt: skip
    results = {(r["path"], r["clients"]): r for r in figures["results"]}
    assert set(results) == {
        ("service", 1),
        *((path, c) for path in ("rest", "rest-multipart", "rest-batch2") for c in (1, 2)),
    }
    # 3 files two to a request: 2 requests, 3 instances stored (counted in _assert_figures).
    assert len(results[("rest-batch2", 1)]["round_instances_per_s"]) == 2
    for result in results.values():
        _assert_figures(result, 3)
        assert result["kind"] == "ct"
        assert len(result["round_instances_per_s"]) == 2  # the median round is reported, every round listed
        assert result["instances_per_s"] == min(result["round_instances_per_s"])
    assert figures["conditions"]["precedent_fsync"] is False  # test settings
    assert "gunicorn 2 gthread workers" in figures["conditions"]["rest_server"]
    assert re.search(r"\| ct\s+\| rest\s+\|\s+2 \|", output)
    stats = pstats.Stats(str(tmp_path / "prof" / "service-ct.prof"))
    phases = dict((label, ms) for label, ms, _ in bench.profile_phases(stats, 3))
    assert phases["instance_ingest (total)"] > phases["  parse + validate: read_header"] > 0
    _assert_nothing_left(precedent_home)


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(not ORTHANC_BINARY.exists(), reason="Orthanc is not installed (apt-get install orthanc)")
def test_orthanc_reference(tmp_path, precedent_home):
    figures, output = _run(
        tmp_path, "--n", "2", "--kinds", "ct", "--clients", "1", "--warmup", "1", "--no-rest", "--rounds", "1"
    )
    results = {(r["path"], r["clients"]): r for r in figures["results"]}
    assert set(results) == {("service", 1), ("orthanc", 1)}
    for result in results.values():
        _assert_figures(result, 2)
    assert figures["conditions"]["orthanc"].startswith("Orthanc 1.")
    _assert_nothing_left(precedent_home)


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(not ORTHANC_BINARY.exists(), reason="Orthanc is not installed (apt-get install orthanc)")
def test_batches_go_to_orthanc_as_zip_archives(tmp_path, precedent_home):
    """Several files per request on both sides: our multipart batch, Orthanc's ZIP body;
    Orthanc answering 200 to each archive is what counts it as stored."""
    figures, output = _run(
        tmp_path,
        *("--n", "4", "--kinds", "ct", "--clients", "1", "--warmup", "2", "--rounds", "1"),
        *("--no-service", "--rest-body", "batch", "--batch-size", "2"),
    )
    results = {(r["path"], r["clients"]): r for r in figures["results"]}
    assert set(results) == {("rest-batch2", 1), ("orthanc", 1), ("orthanc-zip2", 1)}
    for result in results.values():
        _assert_figures(result, 4)
    assert "ct × 1 client(s): rest-batch2 " in output and "vs orthanc-zip2 " in output
    _assert_nothing_left(precedent_home)


@pytest.mark.django_db(transaction=True)  # files go when the deletion commits
def test_missing_orthanc_is_reported_and_keep_then_purge(tmp_path, precedent_home):
    figures, output = _run(
        tmp_path,
        "--n",
        "2",
        "--kinds",
        "ct",
        "--warmup",
        "0",
        "--no-rest",
        "--orthanc",
        "/nonexistent/Orthanc",
        "--keep",
        "--rounds",
        "1",
    )
    assert "Orthanc reference skipped: no Orthanc binary at /nonexistent/Orthanc" in output
    assert [(r["path"], r["instances"]) for r in figures["results"]] == [("service", 2)]
    assert Instance.objects.count() == 2
    assert len(list((precedent_home / "dicom").rglob("*.dcm"))) == 2

    out = StringIO()
    call_command("bench_ingest", "--purge", stdout=out)
    assert "purged 2 instances, 1 studies, 1 patients" in out.getvalue()
    _assert_nothing_left(precedent_home)
