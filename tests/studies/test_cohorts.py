"""Cohorts and the patient-level split that train/evaluate commands rely on."""

from __future__ import annotations

import io

import pytest
from django.core.management import CommandError, call_command
from pydicom.uid import generate_uid

from studies import services
from studies.models import Cohort, Study

pytestmark = pytest.mark.django_db


@pytest.fixture
def cohort(make_dicom) -> Cohort:
    """20 patients with two studies each; every fourth patient has a lesion."""
    studies = []
    for p in range(20):
        for _ in range(2):
            result = services.instance_ingest(
                source=io.BytesIO(
                    make_dicom(PatientID=f"P{p:02}", StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid())
                )
            )
            pathology = "malignant" if p % 4 == 0 else "normal"
            services.finding_upsert(instance=result.instance, source_key="t", pathology=pathology, source="dataset")
            studies.append(result.instance.series.study)
    return services.cohort_add_studies(name="all", studies=studies)


def patients(name: str) -> set[str]:
    return set(Study.objects.filter(cohorts__name=name).values_list("patient__patient_id", flat=True))


def test_split_keeps_patients_apart_and_stratifies(cohort):
    out = io.StringIO()
    call_command("cohort", "split", "all", "--into", "train:0.6", "test:0.4", "--seed", "3", stdout=out)
    train, test = patients("train"), patients("test")
    assert train.isdisjoint(test) and len(train | test) == 20
    assert len(train) == 12 and len(test) == 8
    abnormal = {f"P{p:02}" for p in range(0, 20, 4)}
    assert abnormal & train and abnormal & test  # both parts get abnormal patients
    assert Study.objects.filter(cohorts__name="train").count() == 24  # both studies of each patient
    assert "train: 24 studies, 12 patients" in out.getvalue()


def test_split_is_repeatable(cohort):
    call_command("cohort", "split", "all", "--into", "a:0.5", "b:0.5", "--seed", "1", stdout=io.StringIO())
    first = patients("a")
    Cohort.objects.filter(name__in=["a", "b"]).delete()
    call_command("cohort", "split", "all", "--into", "a:0.5", "b:0.5", "--seed", "1", stdout=io.StringIO())
    assert patients("a") == first


def test_union_joins_cohorts_and_keeps_the_held_out_patients_out(cohort):
    call_command("cohort", "split", "all", "--into", "train:0.6", "val:0.2", "test:0.2", stdout=io.StringIO())
    extra = services.cohort_add_studies(name="extra", studies=list(Study.objects.filter(patient__patient_id="P00")))
    out = io.StringIO()
    call_command(
        "cohort", "union", "pretrain", "--of", "all", extra.name, "--exclude-patients-of", "val", "test", stdout=out
    )
    assert patients("pretrain") == patients("train")  # all of "all" but the val and test patients
    assert Study.objects.filter(cohorts__name="pretrain").count() == 24
    assert "pretrain: 24 studies, 12 patients" in out.getvalue()
    assert "without the patients of val, test" in Cohort.objects.get(name="pretrain").description
    call_command("cohort", "union", "everything", "--of", "train", "val", "test", stdout=io.StringIO())
    assert patients("everything") == patients("all")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["union", "x", "--of", "all", "nope"], "no cohort named 'nope'"),
        (["union", "x", "--of", "all", "--exclude-patients-of", "nope"], "no cohort named 'nope'"),
        (["union", "all", "--of", "all"], "cohort 'all' exists already"),
        (["union", "x", "--of", "all", "--exclude-patients-of", "all"], "no study is left"),
        (["split", "nope", "--into", "a:1"], "no cohort named 'nope'"),
        (["split", "all", "--into", "a:0.5", "b:0.2"], "sum to 1"),
        (["split", "all", "--into", "a"], "NAME:FRACTION"),
        (["show", "nope"], "no cohort named 'nope'"),
    ],
)
def test_bad_arguments_are_one_line_errors(cohort, args, message):
    before = set(Cohort.objects.values_list("name", flat=True))
    with pytest.raises(CommandError, match=message):
        call_command("cohort", *args, stdout=io.StringIO())
    assert set(Cohort.objects.values_list("name", flat=True)) == before  # nothing half-made


def test_list(cohort):
    out = io.StringIO()
    call_command("cohort", "list", stdout=out)
    assert "all: 40 studies, 20 patients, 10 abnormal images, 30 normal images" in out.getvalue()
