"""Triage on arrival: ingest real files, the job runs inline once the ingest commits."""

from __future__ import annotations

import logging
from io import StringIO

import numpy as np
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from pydicom.uid import generate_uid

from studies import services as study_services
from studies.models import Finding, Instance, Study
from triage import services
from triage.models import Category, ImageQuality, TriageAudit, TriageResult

pytestmark = pytest.mark.django_db


def current(study: Study) -> TriageResult:
    return TriageResult.objects.get(study=study, is_current=True)


def study_of(instance) -> Study:
    return instance.series.study


def radiologist_finding(instance, pathology: str, abnormality_class: str, django_capture_on_commit_callbacks, **kw):
    with django_capture_on_commit_callbacks(execute=True):
        study_services.finding_upsert(
            instance=instance,
            source_key=f"radiologist:{pathology}:{abnormality_class}",
            pathology=pathology,
            abnormality_class=abnormality_class,
            source=kw.get("source", Finding.Source.RADIOLOGIST),
        )


def test_a_mammogram_waits_as_pending_without_a_model(ingest, mammogram):
    instance = ingest(mammogram())
    result = current(study_of(instance))
    assert result.category == Category.PENDING
    assert result.reasons == [services.NO_MODEL_REASON]
    assert result.model_versions.count() == 0 and not result.qa_read
    verdict = ImageQuality.objects.get(instance=instance)
    assert verdict.assessable and verdict.task == "mammography"


def test_a_blank_image_is_not_assessable_with_the_reason(ingest, mammogram, film):
    instance = ingest(mammogram(np.full_like(film, 90)))
    result = current(study_of(instance))
    assert result.category == Category.NOT_ASSESSABLE
    assert result.reasons == ["blank image: the pixel values are (nearly) constant"]


def test_pixel_data_that_cannot_be_decoded_is_not_assessable_never_an_error(ingest, mammogram):
    def palette_without_lut(ds):
        ds.PhotometricInterpretation = "PALETTE COLOR"  # stores fine, cannot be decoded

    instance = ingest(mammogram(transform=palette_without_lut))
    result = current(study_of(instance))
    assert result.category == Category.NOT_ASSESSABLE
    assert result.reasons[0].startswith("pixel data cannot be decoded")


def test_a_ct_study_is_not_assessable_by_the_triage_tasks(ingest, make_dicom):
    instance = ingest(make_dicom())
    assert current(study_of(instance)).reasons == ["not a mammogram or chest radiograph (modality CT)"]


def test_a_study_with_some_bad_images_waits_and_says_which(ingest, mammogram, film):
    uid = generate_uid()
    ingest(mammogram(study_uid=uid))
    ingest(mammogram(np.zeros_like(film), study_uid=uid, ImageLaterality="R"))
    study = Study.objects.get(study_instance_uid=uid)
    result = current(study)
    assert result.category == Category.PENDING
    assert result.reasons == [
        services.NO_MODEL_REASON,
        "1 of 2 images: blank image: the pixel values are (nearly) constant",
    ]
    # Each arrival re-triaged the study; the first (single-image) result is history.
    assert TriageResult.objects.filter(study=study).count() == 2


def test_an_arrival_job_for_images_already_triaged_does_nothing(
    ingest, mammogram, monkeypatch, django_capture_on_commit_callbacks
):
    """Each worker process coalesces its own queue, and a study's series each start a
    job: the jobs that find the current result computed on the very images the study
    has now leave it be."""
    uid = generate_uid()
    first = ingest(mammogram(study_uid=uid))
    study = study_of(first)
    result = current(study)
    assert (result.images_seen, result.last_instance_id) == (1, first.pk)
    runs = []
    real = services.triage_study
    monkeypatch.setattr(services, "triage_study", lambda **kw: runs.append(kw) or real(**kw))

    assert services.triage_series(series_id=first.series_id) == result and runs == []
    second = ingest(mammogram(study_uid=uid, ImageLaterality="R"))  # another series of the study
    assert runs == [{"study_id": study.pk}]  # new image: triaged
    assert (current(study).images_seen, current(study).last_instance_id) == (2, second.pk)
    services.triage_series(series_id=first.series_id)  # the first series' late job
    assert len(runs) == 1
    with django_capture_on_commit_callbacks(execute=True):
        Instance.objects.get(pk=second.pk).delete()
    services.triage_series(series_id=first.series_id)  # one image fewer: triaged again
    assert len(runs) == 2 and current(study).images_seen == 1
    # An unchanged decision keeps its row and records what it saw.
    assert TriageResult.objects.filter(study=study).count() == 1


def test_a_radiologist_finding_of_an_urgent_class_makes_the_study_urgent(
    ingest, mammogram, django_capture_on_commit_callbacks
):
    instance = ingest(mammogram())
    study = study_of(instance)
    first = current(study)
    radiologist_finding(instance, "malignant", "SPIC", django_capture_on_commit_callbacks)
    result = current(study)
    assert result.category == Category.URGENT
    assert result.reasons == ["radiologist finding of an urgent class: malignant SPIC"]
    first.refresh_from_db()
    assert not first.is_current  # history kept


def test_dataset_ground_truth_never_steers_the_worklist(ingest, mammogram, django_capture_on_commit_callbacks):
    instance = ingest(mammogram())
    radiologist_finding(
        instance, "malignant", "SPIC", django_capture_on_commit_callbacks, source=Finding.Source.DATASET
    )
    assert current(study_of(instance)).category == Category.PENDING


def test_urgent_classes_are_configurable(ingest, mammogram, settings, django_capture_on_commit_callbacks):
    settings.PRECEDENT_URGENT_FINDINGS = ["benign:calc", "pneumothorax"]
    calc = ingest(mammogram())
    radiologist_finding(calc, "benign", "CALC", django_capture_on_commit_callbacks)
    assert current(study_of(calc)).category == Category.URGENT
    mass = ingest(mammogram(patient_id="TRIAGE-2"))
    radiologist_finding(mass, "malignant", "SPIC", django_capture_on_commit_callbacks)
    result = current(study_of(mass))
    assert result.category == Category.SUSPICIOUS  # malignant, but not an urgent class here
    assert result.reasons == ["radiologist finding: malignant SPIC"]
    assert services.urgent_rules()[1] == services.UrgentRule("*", "pneumothorax")


def test_a_bad_urgent_setting_fails_loudly(settings):
    settings.PRECEDENT_URGENT_FINDINGS = ["malign:mass"]
    with pytest.raises(ImproperlyConfigured, match="malign:mass"):
        services.urgent_rules()


def test_the_job_is_idempotent(ingest, mammogram):
    study = study_of(ingest(mammogram()))
    first = current(study)
    assert services.triage_study(study_id=study.pk) == first
    assert services.triage_study(study_id=study.pk, recheck=True) == first
    assert TriageResult.objects.filter(study=study).count() == 1
    assert services.triage_study(study_id=10**9) is None  # a study deleted meanwhile


def test_a_manual_override_is_audited_and_stands_until_the_study_turns_urgent(
    ingest, mammogram, user, django_capture_on_commit_callbacks
):
    instance = ingest(mammogram())
    study = study_of(instance)
    services.triage_override(study=study, category=Category.ROUTINE, user=user, note="prior benign biopsy")
    assert current(study).reasons == ["category set by hand by reader: prior benign biopsy"]
    audit = TriageAudit.objects.get()
    assert (audit.before["category"], audit.after["category"], audit.user) == ("pending", "routine", user)
    with pytest.raises(ValueError, match="append-only"):
        audit.save()
    services.triage_study(study_id=study.pk)
    assert current(study).category == Category.ROUTINE
    radiologist_finding(instance, "malignant", "mass", django_capture_on_commit_callbacks)
    assert current(study).category == Category.URGENT
    with pytest.raises(ValueError, match="category must be one of"):
        services.triage_override(study=study, category=Category.PENDING, user=user)


def test_qa_marking_is_deterministic_for_a_seed_and_fraction():
    uids = [f"1.2.826.0.1.3680043.8.498.{i}" for i in range(2000)]
    picked = {uid for uid in uids if services.qa_selected(uid, fraction=0.1, seed="a")}
    assert picked == {uid for uid in uids if services.qa_selected(uid, fraction=0.1, seed="a")}
    assert 150 < len(picked) < 250
    assert picked != {uid for uid in uids if services.qa_selected(uid, fraction=0.1, seed="b")}
    assert not any(services.qa_selected(uid, fraction=0.0, seed="a") for uid in uids)
    assert all(services.qa_selected(uid, fraction=1.0, seed="a") for uid in uids)


def test_likely_negative_studies_get_the_qa_mark_from_the_setting(ingest, mammogram, user, settings):
    study = study_of(ingest(mammogram()))
    settings.PRECEDENT_TRIAGE_QA_FRACTION = 1.0
    assert services.triage_override(study=study, category=Category.LIKELY_NEGATIVE, user=user).qa_read
    settings.PRECEDENT_TRIAGE_QA_FRACTION = 0.0
    assert not services.triage_override(study=study, category=Category.LIKELY_NEGATIVE, user=user).qa_read
    settings.PRECEDENT_TRIAGE_QA_FRACTION = 1.0
    assert not services.triage_override(study=study, category=Category.ROUTINE, user=user).qa_read


def test_the_triage_command_catches_up(ingest, mammogram, make_dicom):
    mg = study_of(ingest(mammogram()))
    ct = study_of(ingest(make_dicom()))
    TriageResult.objects.all().delete()
    ImageQuality.objects.filter(instance__series__study=ct).delete()
    out = StringIO()
    call_command("triage", "--pending", stdout=out, verbosity=0)
    assert out.getvalue().strip() == "2 studies triaged: 1 pending, 1 not_assessable"
    assert current(mg).category == Category.PENDING and current(ct).category == Category.NOT_ASSESSABLE
    # Pending studies are picked up again (a model may have arrived); decided ones are not.
    out = StringIO()
    call_command("triage", "--pending", stdout=out, verbosity=0)
    assert out.getvalue().strip() == "1 study triaged: 1 pending"
    out = StringIO()
    call_command("triage", "--all", stdout=out, verbosity=0)
    assert out.getvalue().startswith("2 studies triaged")


@pytest.mark.parametrize(("verbosity", "lines"), [(1, 0), (2, 2)])
def test_the_triage_command_logs_a_line_per_study_only_when_asked(ingest, mammogram, caplog, verbosity, lines):
    """Its progress bar and summary are what a user reads; a line per study (hundreds in
    the demo) comes with -v 2. The logger's level is as before once the command ends."""
    for _ in range(2):
        ingest(mammogram())
    TriageResult.objects.all().delete()
    caplog.set_level(logging.INFO, logger="triage.services")
    caplog.clear()  # what the arrivals logged
    call_command("triage", "--pending", stdout=StringIO(), stderr=StringIO(), verbosity=verbosity)
    assert len([r for r in caplog.records if " triaged " in r.getMessage()]) == lines
    assert logging.getLogger("triage.services").level == logging.INFO


def test_a_growing_series_of_unassessable_images_writes_one_result(ingest, make_dicom):
    uid, series = generate_uid(), generate_uid()
    for _ in range(3):
        ingest(make_dicom(StudyInstanceUID=uid, SeriesInstanceUID=series))
    study = Study.objects.get(study_instance_uid=uid)
    assert TriageResult.objects.filter(study=study).count() == 1
    assert ImageQuality.objects.filter(instance__series__study=study).count() == 3


def test_bad_triage_settings_fail_the_system_check(settings):
    from triage.checks import triage_settings

    assert triage_settings(None) == []
    settings.PRECEDENT_TRIAGE_QA_FRACTION = 1.5
    settings.PRECEDENT_TRIAGE_TASKS = ["mammography", "knee"]
    messages = [error.msg for error in triage_settings(None)]
    assert messages == [
        "PRECEDENT_TRIAGE_QA_FRACTION must be between 0 and 1, got 1.5",
        "PRECEDENT_TRIAGE_TASKS: unknown triage task knee; known: mammography, chest",
    ]


@pytest.mark.django_db(transaction=True)
def test_an_image_deleted_while_its_study_was_checked_gets_no_verdict(ingest, mammogram):
    """The quality check reads a study's images, then stores its verdicts; an image
    deleted in between (by another process) must not fail the store, whose foreign key
    is checked at commit."""
    study_uid = generate_uid()
    kept, gone = ingest(mammogram(study_uid=study_uid)), ingest(mammogram(study_uid=study_uid, InstanceNumber=2))
    verdicts = [ImageQuality(instance=i, assessable=True, task="mammography") for i in (kept, gone)]
    Instance.objects.filter(pk=gone.pk).delete()
    services.store_verdicts(verdicts)
    stored = ImageQuality.objects.filter(instance__series__study__study_instance_uid=study_uid)
    assert list(stored.values_list("instance_id", "task")) == [(kept.pk, "mammography")]
