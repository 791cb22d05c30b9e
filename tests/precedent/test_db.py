"""precedent.db: storing rows whose targets a concurrent transaction deletes."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable

import pytest
from django.db import IntegrityError, connection, transaction

from precedent.db import write_while_targets_exist
from studies import services as study_services
from studies.models import Instance
from triage.models import ImageQuality


def _stored(*files: bytes) -> list[Instance]:
    instances = [study_services.instance_ingest(source=io.BytesIO(data), name="ct.dcm").instance for data in files]
    ImageQuality.objects.all().delete()  # what the arrivals' triage wrote
    return instances


def _delete_elsewhere(pk: int) -> None:
    """Delete the instance from another connection, committed before this one's commit."""

    def run() -> None:
        try:
            Instance.objects.filter(pk=pk).delete()
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()


@pytest.fixture(autouse=True)
def inline_jobs(settings):
    settings.PRECEDENT_WORKER = "inline"  # the arrival's triage runs (and is done) at its commit


@pytest.mark.django_db(transaction=True)
def test_a_commit_that_loses_its_target_is_tried_again_without_it(make_dicom):
    kept, gone = _stored(make_dicom(), make_dicom())
    seen: list[set[int]] = []

    def write() -> None:
        alive = set(Instance.objects.filter(pk__in=[kept.pk, gone.pk]).values_list("pk", flat=True))
        seen.append(alive)
        if len(seen) == 1:
            _delete_elsewhere(gone.pk)  # after this transaction read that it still existed
        ImageQuality.objects.bulk_create(ImageQuality(instance_id=pk, assessable=True) for pk in sorted(alive))

    write_while_targets_exist(write)
    assert seen == [{kept.pk, gone.pk}, {kept.pk}]  # the first commit failed the key check
    assert list(ImageQuality.objects.values_list("instance_id", flat=True)) == [kept.pk]


@pytest.fixture
def dangling_write(make_dicom) -> tuple[Callable[[], None], list[int]]:
    """A write whose row points at an instance that never exists, and its calls."""
    (instance,) = _stored(make_dicom())
    calls: list[int] = []

    def write() -> None:
        calls.append(1)
        ImageQuality.objects.create(instance_id=instance.pk + 10**6, assessable=True)

    return write, calls


@pytest.mark.django_db(transaction=True)
def test_a_write_that_keeps_failing_raises_after_its_attempts(dangling_write):
    write, calls = dangling_write
    with pytest.raises(IntegrityError):
        write_while_targets_exist(write, attempts=2)
    assert len(calls) == 2 and not ImageQuality.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_inside_a_callers_transaction_it_runs_once(dangling_write):
    write, calls = dangling_write
    with pytest.raises(IntegrityError), transaction.atomic():
        write_while_targets_exist(write)  # the key is checked at the caller's commit
    assert len(calls) == 1 and not ImageQuality.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_other_integrity_errors_are_not_tried_again(make_dicom):
    (instance,) = _stored(make_dicom())
    ImageQuality.objects.create(instance=instance, assessable=True)
    calls = []

    def write() -> None:
        calls.append(1)
        ImageQuality.objects.create(instance=instance, assessable=False)  # one verdict per image

    with pytest.raises(IntegrityError, match="unique"):
        write_while_targets_exist(write)
    assert len(calls) == 1
