"""Two uploads of the same instance at the same moment: one row, one file, no error."""

from __future__ import annotations

import io
import threading

import pydicom
import pytest
from django.db import connection

from studies import services
from studies.models import Instance
from studies.services import Outcome


def race(payloads: list[bytes]) -> list[services.IngestResult]:
    """Ingest each payload in its own thread (own DB connection), released together."""
    barrier = threading.Barrier(len(payloads))
    results: list[services.IngestResult | BaseException] = [None] * len(payloads)  # type: ignore[list-item]

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = services.instance_ingest(source=io.BytesIO(payloads[i]), name=f"upload-{i}")
        except BaseException as exc:  # surfaced by the assertion below
            results[i] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not any(isinstance(r, BaseException) for r in results), results
    return results  # type: ignore[return-value]


@pytest.mark.django_db(transaction=True)
def test_same_instance_raced_is_stored_once(make_dicom, precedent_home):
    data = make_dicom()
    for _ in range(3):  # a few rounds: a race is a matter of luck
        uid = pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID
        results = race([data] * 4)
        outcomes = sorted(r.outcome for r in results)
        assert outcomes.count(Outcome.STORED) == 1
        assert outcomes.count(Outcome.DUPLICATE) == 3
        assert Instance.objects.filter(sop_instance_uid=uid).count() == 1
        data = make_dicom()
    assert len(list((precedent_home / "dicom").rglob("*.dcm"))) == Instance.objects.count() == 3
    assert list((precedent_home / "tmp").iterdir()) == []


@pytest.mark.django_db(transaction=True)
def test_same_uid_other_bytes_raced_one_wins(make_dicom, precedent_home):
    first = make_dicom()
    uid = pydicom.dcmread(io.BytesIO(first)).SOPInstanceUID
    second = make_dicom(SOPInstanceUID=uid, PatientName="Other^Person")
    results = race([first, second])
    assert sorted(r.outcome for r in results) == [Outcome.REJECTED, Outcome.STORED]
    loser = next(r for r in results if r.outcome == Outcome.REJECTED)
    assert loser.http_status == 409
    assert Instance.objects.count() == 1
    assert len(list((precedent_home / "dicom").rglob("*.dcm"))) == 1


@pytest.mark.django_db(transaction=True)
def test_instances_of_one_new_study_raced_share_one_study(make_dicom):
    from pydicom.uid import generate_uid

    study, series = generate_uid(), generate_uid()
    payloads = [make_dicom(StudyInstanceUID=study, SeriesInstanceUID=series) for _ in range(4)]
    results = race(payloads)
    assert all(r.outcome == Outcome.STORED for r in results)
    assert Instance.objects.filter(series__study__study_instance_uid=study).count() == 4
