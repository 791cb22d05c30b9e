"""Several files in one transaction (`services.instances_ingest`): each file gets the
outcome it would get alone, one INSERT serves the batch, and a batch that fails leaves
no row and no file behind."""

from __future__ import annotations

import io
import threading

import pydicom
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from pydicom.uid import generate_uid

from studies import services
from studies.models import Instance, Series
from studies.services import Outcome


def _items(payloads: list[bytes]) -> list[tuple[io.BytesIO, str]]:
    return [(io.BytesIO(data), f"file-{i}") for i, data in enumerate(payloads)]


def _stored_files(home) -> set[str]:
    return {str(p.relative_to(home)) for p in (home / "dicom").rglob("*.dcm")} if (home / "dicom").exists() else set()


@pytest.mark.django_db
def test_each_file_of_a_batch_gets_its_own_outcome_in_order(make_dicom, precedent_home):
    stored_before = make_dicom()
    assert services.instance_ingest(source=io.BytesIO(stored_before)).outcome == Outcome.STORED
    before_uid = pydicom.dcmread(io.BytesIO(stored_before)).SOPInstanceUID
    series_uid = generate_uid()  # a new series, two of whose instances come in this batch
    new_a, new_b = make_dicom(SeriesInstanceUID=series_uid), make_dicom(SeriesInstanceUID=series_uid)
    repeated_uid = pydicom.dcmread(io.BytesIO(new_a)).SOPInstanceUID
    payloads = [
        new_a,
        stored_before,  # the same bytes again: duplicate
        make_dicom(SOPInstanceUID=before_uid, PatientName="Other^Person"),  # other bytes: conflict
        b"not a DICOM file at all",
        new_b,
        new_a,  # a repeat inside the batch: a duplicate of the first
        make_dicom(SOPInstanceUID=repeated_uid, PatientName="Third^Person"),  # a conflicting repeat
    ]

    results = services.instances_ingest(_items(payloads))

    assert [r.name for r in results] == [f"file-{i}" for i in range(len(payloads))]
    assert [r.outcome for r in results] == [
        Outcome.STORED,
        Outcome.DUPLICATE,
        Outcome.REJECTED,
        Outcome.REJECTED,
        Outcome.STORED,
        Outcome.DUPLICATE,
        Outcome.REJECTED,
    ]
    assert [r.http_status for r in results] == [201, 200, 409, 400, 201, 200, 409]
    assert "already stored with different content" in results[2].reason
    assert "already stored with different content" in results[6].reason
    assert results[5].sop_instance_uid == repeated_uid
    assert Instance.objects.count() == 3
    assert Series.objects.get(series_instance_uid=series_uid).instances.count() == 2
    # Exactly the files rows refer to, and no spool left over.
    assert _stored_files(precedent_home) == set(Instance.objects.values_list("file_path", flat=True))
    assert list((precedent_home / "tmp").iterdir()) == []


@pytest.mark.django_db
def test_a_batch_of_a_stored_series_is_one_insert(make_dicom, precedent_home):
    series_uid = generate_uid()
    first = make_dicom(SeriesInstanceUID=series_uid)
    services.instance_ingest(source=io.BytesIO(first))
    payloads = [make_dicom(SeriesInstanceUID=series_uid) for _ in range(6)]

    with CaptureQueriesContext(connection) as queries:
        results = services.instances_ingest(_items(payloads))

    assert [r.outcome for r in results] == [Outcome.STORED] * 6
    inserts = [q["sql"] for q in queries.captured_queries if q["sql"].startswith('INSERT INTO "studies_instance"')]
    locks = [q["sql"] for q in queries.captured_queries if "pg_advisory_xact_lock" in q["sql"]]
    assert len(inserts) == 1 and len(locks) == 1
    assert Series.objects.get(series_instance_uid=series_uid).instances.count() == 7


@pytest.mark.django_db
def test_batches_are_cut_at_batch_size(make_dicom, precedent_home):
    with CaptureQueriesContext(connection) as queries:
        results = services.instances_ingest(_items([make_dicom() for _ in range(5)]), batch_size=2)
    assert [r.outcome for r in results] == [Outcome.STORED] * 5
    assert sum("pg_advisory_xact_lock" in q["sql"] for q in queries.captured_queries) == 3
    with pytest.raises(ValueError, match="batch_size"):
        services.instances_ingest([], batch_size=0)


@pytest.mark.django_db(transaction=True)
def test_a_batch_that_fails_leaves_no_row_and_no_file(make_dicom, precedent_home, monkeypatch):
    """An error the service did not foresee, after the files were placed: the
    transaction rolls back, the placed files go, the spools go, the error is raised."""
    real = services._insert_or_find
    placed: list[str] = []

    def failing(group, relatives):
        placed.extend(relatives)
        real(group, relatives)
        raise RuntimeError("the database went away")

    monkeypatch.setattr(services, "_insert_or_find", failing)
    with pytest.raises(RuntimeError, match="went away"):
        services.instances_ingest(_items([make_dicom(), make_dicom(), make_dicom()]))
    assert len(placed) == 3
    assert Instance.objects.count() == 0
    assert _stored_files(precedent_home) == set()
    assert list((precedent_home / "tmp").iterdir()) == []


@pytest.mark.django_db(transaction=True)
def test_batches_sharing_instances_in_opposite_orders_do_not_deadlock(make_dicom, precedent_home, monkeypatch):
    """Each batch takes its locks in one order (by key), so two batches that hold the
    same instances in reverse order cannot wait on each other; every instance is
    stored once and is a duplicate for the other batch."""
    real_lock = services._lock_instances
    barrier = threading.Barrier(2)

    def lock_together(uids):
        barrier.wait()  # both batches ask for their locks at the same moment
        real_lock(uids)

    monkeypatch.setattr(services, "_lock_instances", lock_together)
    for _ in range(3):  # a race is a matter of luck: a few rounds
        payloads = [make_dicom() for _ in range(services.INGEST_BATCH)]
        orders = [payloads, payloads[::-1]]
        results: list = [None, None]

        def run(i: int, orders=orders, results=results) -> None:
            try:
                results[i] = services.instances_ingest(_items(orders[i]))
            except BaseException as exc:  # surfaced by the assertion below
                results[i] = exc
            finally:
                connection.close()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(isinstance(r, BaseException) for r in results), results
        outcomes = [r.outcome for batch in results for r in batch]
        assert outcomes.count(Outcome.STORED) == outcomes.count(Outcome.DUPLICATE) == services.INGEST_BATCH
    assert Instance.objects.count() == 3 * services.INGEST_BATCH
    assert _stored_files(precedent_home) == set(Instance.objects.values_list("file_path", flat=True))
    assert list((precedent_home / "tmp").iterdir()) == []
