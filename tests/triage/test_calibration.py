"""Training, calibration and sign-off end to end on a few real MIAS films, and scoring
on arrival with a signed-off operating point."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import torchvision
from django.core.management import CommandError, call_command
from django.db import IntegrityError, transaction
from django.urls import reverse
from django.utils import timezone

from embeddings import encoder as enc
from studies.models import Cohort, Study
from tests.triage.classifier_helpers import import_tiny_cohort
from triage import classifier, services
from triage.models import Category, OperatingPoint, TriageAudit, TriageModelVersion, TriageResult

pytestmark = pytest.mark.django_db


def run(name: str, *args: str) -> str:
    out = io.StringIO()
    call_command(name, *args, stdout=out)
    return out.getvalue()


@pytest.fixture
def active_classifier() -> TriageModelVersion:
    """A real (untrained, seeded) classifier, registered and active: scores are real outputs."""
    torch.manual_seed(0)
    model = classifier.build_classifier("resnet18")
    return services.triage_model_register(
        kind="classifier", model=model, meta=classifier.classifier_meta(model), activate=True
    )


def test_train_triage_trains_registers_and_activates_a_classifier(datasets: Path) -> None:
    import_tiny_cohort(datasets)
    output = run(
        "train_triage", "--cohort", "tiny", "--epochs", "1", "--activate", "--name", "tiny-cls", "--max-minutes", "5"
    )
    version = TriageModelVersion.objects.get(name="tiny-cls")
    assert version.status == "active" and version.kind == "classifier"
    training = version.metadata["training"]
    assert training["cohort"] == "tiny" and training["images"] == 8 and training["abnormal"] == 3
    assert training["config"]["max_seconds"] == 300 and training["stopped_by_clock"] is False
    assert version.metadata["preprocessing"]["input_size"] >= 512
    assert "registered, active" in output
    loaded = services.active_triage_model("classifier")
    assert loaded.version == version

    # Its own training patients cannot calibrate it: a threshold fitted on them
    # promises more than new patients get. Allowed on request, and recorded.
    with pytest.raises(CommandError, match=r"holds patients the models were trained on \(4 of 4 in tiny-cls's"):
        run("calibrate_triage", "--cohort", "tiny")
    assert not OperatingPoint.objects.exists()
    output = run("calibrate_triage", "--cohort", "tiny", "--allow-training-patients")
    assert "warning: 4 of these 4 patients are in tiny-cls's training cohort" in output
    assert OperatingPoint.objects.get().validation["training_patients"] == {"tiny-cls": 4}
    report = json.loads(run("evaluate_triage", "--cohort", "tiny", "--json"))
    assert report["training_patients"] == {"tiny-cls": 4}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--cohort", "nope"), "no cohort named 'nope'"),
        (("--cohort", "tiny", "--epochs", "0"), "--epochs must be at least 1"),
        (("--cohort", "tiny", "--model", "all", "--name", "x"), "--name names one model"),
        (("--cohort", "tiny", "--crop", "128"), "--crop applies to the detector and segmenter only"),
        (("--cohort", "tiny", "--model", "segmenter", "--breast-crop"), "--breast-crop applies to the detector only"),
        (("--cohort", "tiny", "--model", "detector", "--max-minutes", "0"), "--max-minutes must be positive"),
        (("--cohort", "tiny", "--model", "segmenter", "--init-from-encoder"), "applies to the classifier and detector"),
        (("--cohort", "tiny", "--model", "detector", "--init-from-encoder"), "no search encoder is active"),
    ],
)
def test_train_triage_bad_input(datasets: Path, args: tuple[str, ...], message: str) -> None:
    Cohort.objects.create(name="tiny")
    with pytest.raises(CommandError, match=message):
        run("train_triage", *args)


def test_train_triage_passes_size_crop_time_budget_and_start_weights_to_the_detector(
    datasets: Path, tmp_path: Path
) -> None:
    import_tiny_cohort(datasets)
    encoder_file = tmp_path / "encoder.pt"
    enc.save_encoder(encoder_file, enc.build_encoder("resnet18", dim=32))
    output = run(
        "train_triage", "--cohort", "tiny", "--model", "detector", "--epochs", "1", "--name", "tiny-det",
        "--input-size", "160", "--batch-size", "2", "--crop", "96", "--max-minutes", "5", "--breast-crop",
        "--weights", str(encoder_file),
    )  # fmt: skip
    metadata = TriageModelVersion.objects.get(name="tiny-det").metadata
    settings = metadata["training"]["settings"]
    assert (settings["input_size"], settings["batch_size"], settings["crop"]) == (160, 2, 96)
    assert settings["breast_crop"] is True and metadata["preprocessing"]["breast_crop"] is True
    # The whole ResNet trunk under the FPN came from the encoder file.
    assert settings["init"]["source"] == "encoder.pt"
    assert settings["init"]["loaded"] == settings["init"]["total"] > 100
    assert "detector tiny-det registered" in output


@pytest.mark.parametrize("model", ["classifier", "detector"])
def test_train_triage_refuses_bad_start_weights_before_reading_the_cohort(tmp_path: Path, model: str) -> None:
    """The weights file is checked first: the bare cohort would fail later on (no
    labelled images, no boxes), and a real cohort would be decoded for nothing."""
    Cohort.objects.create(name="bare")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CommandError, match="junk.pt is not a readable torch weights file"):
        run("train_triage", "--cohort", "bare", "--model", model, "--epochs", "1", "--weights", str(junk))
    wrong = tmp_path / "r50.pt"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), wrong)
    with pytest.raises(CommandError, match="r50.pt does not fit"):
        run("train_triage", "--cohort", "bare", "--model", model, "--epochs", "1", "--weights", str(wrong))
    assert not TriageModelVersion.objects.exists()


def test_train_triage_on_a_cohort_without_labels_says_so() -> None:
    Cohort.objects.create(name="bare")
    with pytest.raises(CommandError, match="no labelled images"):
        run("train_triage", "--cohort", "bare", "--epochs", "1")
    assert not TriageModelVersion.objects.exists()


def test_calibrate_stores_an_operating_point_not_signed_off(datasets: Path, active_classifier) -> None:
    import_tiny_cohort(datasets)
    output = run("calibrate_triage", "--cohort", "tiny")
    point = OperatingPoint.objects.get()
    assert point.signed_off_at is None and point.validation_cohort.name == "tiny"
    assert point.sensitivity == 1.0  # the default target keeps every abnormal exam
    assert point.validation["exams"] == 4 and point.validation["abnormal_exams"] == 2
    assert point.validation["curve"][0]["threshold"] is None  # +inf: nothing flagged
    # All 2 abnormal exams flagged: an exact 95 % interval of 0.158-1.000 is all 2 can promise.
    assert point.validation["sensitivity_counts"] == [2, 2]
    assert point.validation["sensitivity_ci95"] == [pytest.approx(0.025**0.5), 1.0]
    assert "sensitivity 1.000 (target 1; 2/2, 95 % CI 0.158–1.000)" in output
    assert list(point.model_versions.all()) == [active_classifier]
    # Only a classifier active: its P(abnormal) is the score, recorded with the point.
    assert point.score_source == "classifier" and point.validation["score_source"] == "classifier"
    assert "on the classifier P(abnormal)" in output and "not signed off" in output


def test_calibrate_with_sign_off_is_audited_and_retriages_pending_studies(
    datasets: Path, active_classifier, admin, django_capture_on_commit_callbacks
) -> None:
    import_tiny_cohort(datasets)
    services.triage_studies(studies=Study.objects.all())
    assert set(TriageResult.objects.filter(is_current=True).values_list("category", flat=True)) == {"pending"}
    with django_capture_on_commit_callbacks(execute=True):
        output = run("calibrate_triage", "--cohort", "tiny", "--sign-off", "chief")
    point = OperatingPoint.objects.get()
    assert point.signed_off_by == admin and "signed off by chief" in output
    assert point.validation["tasks"] == ["mammography"]  # what its threshold may decide
    audit = TriageAudit.objects.get(action=TriageAudit.Action.OPERATING_POINT)
    assert audit.user == admin and audit.operating_point == point and audit.after["via"] == "command"
    current = TriageResult.objects.filter(is_current=True)
    assert current.count() == 4
    assert not current.filter(category="pending").exists(), "pending studies were re-triaged"
    # Every abnormal exam of the validation cohort stays above the threshold (sensitivity 1.0).
    for result in current:
        assert result.operating_point == point
        assert result.scores["exam"]["p_abnormal"] >= 0


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (None, ("--cohort", "nope"), "no cohort named 'nope'"),
        ("empty", ("--cohort", "empty"), "cohort 'empty' is empty"),
        ("tiny", ("--cohort", "tiny", "--target-sensitivity", "0"), "must be in \\(0, 1\\]"),
        ("tiny", ("--cohort", "tiny", "--sign-off", "ghost"), "no user named 'ghost'"),
        ("tiny", ("--cohort", "tiny", "--sign-off", "reader"), "not an admin"),
    ],
)
def test_calibrate_bad_input(datasets: Path, active_classifier, user, setup, args, message) -> None:
    if setup == "empty":
        Cohort.objects.create(name="empty")
    elif setup == "tiny":
        import_tiny_cohort(datasets)
    with pytest.raises(CommandError, match=message):
        run("calibrate_triage", *args)
    assert not OperatingPoint.objects.exists()


def test_calibrate_refuses_a_cohort_without_labels_and_without_a_model(
    datasets: Path, mammogram, ingest, active_classifier
) -> None:
    instance = ingest(mammogram())
    cohort = Cohort.objects.create(name="unlabelled")
    cohort.studies.add(instance.series.study)
    with pytest.raises(CommandError, match="no labelled images"):
        run("calibrate_triage", "--cohort", "unlabelled")
    TriageModelVersion.objects.update(status="retired")
    import_tiny_cohort(datasets)
    with pytest.raises(CommandError, match="no classifier is active"):
        run("calibrate_triage", "--cohort", "tiny")
    assert not OperatingPoint.objects.exists()


def test_sign_off_is_refused_without_a_validation_run(admin) -> None:
    point = OperatingPoint.objects.create(threshold=0.3, sensitivity=1, specificity=0.5, workload_reduction=0.4)
    with pytest.raises(ValueError, match="no validation run"):
        services.operating_point_sign_off(point=point, user=admin)
    with pytest.raises(IntegrityError), transaction.atomic():
        OperatingPoint.objects.filter(pk=point.pk).update(signed_off_by=admin, signed_off_at=timezone.now())
    assert not TriageAudit.objects.exists()


def _computed_point(classifier_version, threshold: float) -> OperatingPoint:
    point = OperatingPoint.objects.create(
        threshold=threshold,
        sensitivity=1.0,
        specificity=0.5,
        workload_reduction=0.3,
        validation_cohort=Cohort.objects.create(name=f"val-{threshold}"),
        validation={
            "exams": 4,
            "patients": 4,
            "abnormal_exams": 2,
            "curve": [
                {"threshold": None, "sensitivity": 0.0, "specificity": 1.0, "workload_reduction": 1.0},
                {"threshold": threshold, "sensitivity": 1.0, "specificity": 0.5, "workload_reduction": 0.3},
            ],
        },
        computed_at=timezone.now(),
    )
    point.model_versions.set([classifier_version])
    return point


@pytest.mark.parametrize(("offset", "category"), [(+0.05, Category.LIKELY_NEGATIVE), (-0.05, Category.ROUTINE)])
def test_scoring_on_arrival_follows_the_signed_off_threshold(
    settings, mammogram, ingest, active_classifier, admin, django_capture_on_commit_callbacks, offset, category
) -> None:
    settings.PRECEDENT_TRIAGE_SUSPICIOUS_MALIGNANT = 1.0
    first = ingest(mammogram(patient_id="P-1"))
    study = first.series.study
    assert study.triage_results.get(is_current=True).category == Category.PENDING
    loaded = services.active_triage_model("classifier")
    p = services.classify_study(study, loaded)["exam"]["p_abnormal"]
    point = _computed_point(active_classifier, threshold=p + offset)
    with django_capture_on_commit_callbacks(execute=True):
        services.operating_point_sign_off(point=point, user=admin)
    result = study.triage_results.get(is_current=True)
    assert result.category == category
    assert result.operating_point == point and list(result.model_versions.all()) == [active_classifier]
    assert result.scores["exam"]["p_abnormal"] == pytest.approx(p, abs=1e-6)
    assert set(result.scores["images"]) == {first.sop_instance_uid}
    assert f"{p:.3f}" in result.reasons[0] and f"{p + offset:.3f}" in result.reasons[0]
    # A later arrival is scored at once with the same point.
    second = ingest(mammogram(patient_id="P-2"))
    assert second.series.study.triage_results.get(is_current=True).category == category


def test_a_high_malignancy_score_makes_the_study_suspicious(
    settings, mammogram, ingest, active_classifier, admin, django_capture_on_commit_callbacks
) -> None:
    settings.PRECEDENT_TRIAGE_SUSPICIOUS_MALIGNANT = 0.0
    with django_capture_on_commit_callbacks(execute=True):
        services.operating_point_sign_off(point=_computed_point(active_classifier, 0.99), user=admin)
    result = ingest(mammogram()).series.study.triage_results.get(is_current=True)
    assert result.category == Category.SUSPICIOUS and "P(malignant)" in result.reasons[0]


def test_non_mammography_studies_keep_waiting(
    make_dicom, ingest, active_classifier, admin, django_capture_on_commit_callbacks
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        services.operating_point_sign_off(point=_computed_point(active_classifier, 0.5), user=admin)
    instance = ingest(make_dicom())
    result = instance.series.study.triage_results.get(is_current=True)
    assert result.category in (Category.PENDING, Category.NOT_ASSESSABLE)
    assert "p_abnormal" not in str(result.scores)


def test_decide_with_detections() -> None:
    rules = services.urgent_rules()
    images = [services.ImageVerdict(True)]
    state = services.ModelState(classifier="c", operating_point=True, threshold=0.5)
    scores = {"exam": {"p_abnormal": 0.1, "p_malignant": 0.0}, "breasts": {"L": {"p_abnormal": 0.1}}}

    def with_box(label: str, score: float) -> services.Decision:
        return services.decide(
            images=images,
            findings=[],
            rules=rules,
            models=state,
            scores=scores,
            detections=[services.ModelDetection(label, score, "1.2.3")],
        )

    urgent = with_box("malignant:mass", 0.95)
    assert urgent.category == Category.URGENT and "malignant:mass" in urgent.reasons[0]
    assert with_box("benign:CALC", 0.6).category == Category.SUSPICIOUS
    assert with_box("malignant:mass", 0.2).category == Category.LIKELY_NEGATIVE
    # The detector's own boxes name a class, no pathology: an urgent class by default
    # (malignant:SPIC) is urgent at the urgent score; a class no rule names is suspicious.
    assert with_box("SPIC", 0.95).category == Category.URGENT
    assert with_box("pneumothorax", 0.95).category == Category.URGENT
    assert with_box("CALC", 0.95).category == Category.SUSPICIOUS
    no_point = services.decide(
        images=images, findings=[], rules=rules, models=services.ModelState(classifier="c"), scores=None
    )
    assert no_point.category == Category.PENDING and "no operating point" in no_point.reasons[0]


# --- the calibration page ------------------------------------------------------------------


def test_calibration_page_draws_curves_and_signs_off_with_an_audit(
    client, admin, active_classifier, django_capture_on_commit_callbacks
) -> None:
    point = _computed_point(active_classifier, 0.4)
    point.validation.update(sensitivity_counts=[2, 2], sensitivity_ci95=[0.158, 1.0])
    point.save(update_fields=["validation"])
    client.force_login(admin)
    page = client.get(reverse("triage:calibration"))
    assert page.status_code == 200
    assert f"Operating point {point.pk}" in page.text and "Sign off" in page.text
    assert "2 of 2 abnormal exams flagged, 95 % CI 0.158–1.000" in page.text
    # The navigation marks Calibration as the current page, not the worklist it sits under.
    assert page.text.count('aria-current="page"') == 1 and 'aria-current="page">Calibration</a>' in page.text
    png = client.get(reverse("triage:calibration-curves", args=[point.pk]))
    assert png.status_code == 200 and png["Content-Type"] == "image/png" and png.content[:4] == b"\x89PNG"
    with django_capture_on_commit_callbacks(execute=True):
        signed = client.post(reverse("triage:calibration-sign-off", args=[point.pk]), HTTP_HX_REQUEST="true")
    assert signed.status_code == 200 and "signed off" in signed.text
    point.refresh_from_db()
    assert point.signed_off_by == admin
    assert TriageAudit.objects.get(action="operating_point").after["via"] == "web"
    again = client.post(reverse("triage:calibration-sign-off", args=[point.pk]), HTTP_HX_REQUEST="true")
    assert again.status_code == 409 and "signed off already" in again.text


def test_calibration_page_is_for_admins_only(browser_client, active_classifier) -> None:
    point = _computed_point(active_classifier, 0.4)
    assert browser_client.get(reverse("triage:calibration")).status_code == 403
    assert browser_client.post(reverse("triage:calibration-sign-off", args=[point.pk])).status_code == 403
    point.refresh_from_db()
    assert point.signed_off_at is None


def test_a_point_without_validation_cannot_be_signed_off_on_the_page(client, admin) -> None:
    point = OperatingPoint.objects.create(threshold=0.3, sensitivity=1, specificity=0.5, workload_reduction=0.4)
    client.force_login(admin)
    assert "cannot be signed off" in client.get(reverse("triage:calibration")).text
    response = client.post(reverse("triage:calibration-sign-off", args=[point.pk]))
    assert response.status_code == 409
    point.refresh_from_db()
    assert point.signed_off_at is None


def test_calibration_scores_only_the_images_triage_scores_on_arrival(
    datasets: Path, mammogram, ingest, active_classifier, client, admin
) -> None:
    """A labelled chest film and a blank mammogram in the validation cohort: triage on
    arrival gives neither to the mammography classifier (a chest film is not its task,
    the blank film is not assessable), so calibration must not fit its threshold on
    them either. They are counted as left out, and evaluate_triage says so too."""
    import numpy as np

    from studies.models import Finding
    from studies.services import cohort_add_studies

    import_tiny_cohort(datasets)
    run("import_dataset", "nih-cxr", str(datasets / "nih-chestxray14-bbox"), "--limit", "1", "--cohort", "tiny")
    blank = ingest(mammogram(np.zeros((512, 400), dtype=np.uint16), patient_id="BLANK-1"))
    Finding.objects.create(instance=blank, pathology="normal", source=Finding.Source.DATASET)
    tiny = Cohort.objects.get(name="tiny")
    cohort_add_studies(name="tiny", studies=[blank.series.study])
    assert tiny.studies.count() == 6

    run("calibrate_triage", "--cohort", "tiny")
    validation = OperatingPoint.objects.get().validation
    assert validation["exams"] == 4 and validation["abnormal_exams"] == 2
    assert validation["left_out_exams"] == 2
    # The admin who signs it off sees what was left out.
    client.force_login(admin)
    assert "2 labelled exams left out" in client.get(reverse("triage:calibration")).text
    chest = services.ImageQuality.objects.exclude(instance__series__modality="MG").get()
    assert chest.task == "chest" and chest.assessable
    blank.refresh_from_db()
    assert not blank.triage_quality.assessable

    report = run("evaluate_triage", "--cohort", "tiny", "--json")
    result = json.loads(report)
    assert result["exams"] == 4 and result["left_out_exams"] == 2
    assert result["by_source"]["classifier"]["exams"] == 4
    text = run("evaluate_triage", "--cohort", "tiny")
    assert "left out: 2 labelled exams" in text


def test_an_admin_picks_another_threshold_on_the_curve_and_signs_it_off(
    client, browser_client, admin, active_classifier, django_capture_on_commit_callbacks
) -> None:
    point = _computed_point(active_classifier, 0.4)
    point.validation.update(
        normal_exams=2,
        curve=[
            {"threshold": None, "sensitivity": 0.0, "specificity": 1.0, "workload_reduction": 1.0},
            {"threshold": 0.6, "sensitivity": 0.5, "specificity": 1.0, "workload_reduction": 0.75},
            {"threshold": 0.4, "sensitivity": 1.0, "specificity": 0.5, "workload_reduction": 0.25},
        ],
    )
    point.save(update_fields=["validation"])
    url = reverse("triage:calibration-at-threshold", args=[point.pk])
    assert browser_client.post(url, {"threshold": "0.6"}).status_code == 403  # a radiologist
    client.force_login(admin)
    page = client.get(reverse("triage:calibration")).text
    assert '<option value="0.6">0.600000: sensitivity 0.500, specificity 1.000, workload reduction 0.750' in page
    assert client.post(url, {"threshold": "0.55"}).status_code == 400  # not on the curve
    assert client.post(url, {"threshold": "x"}).status_code == 400

    response = client.post(url, {"threshold": "0.6"})
    derived = OperatingPoint.objects.exclude(pk=point.pk).get()
    assert response.status_code == 302 and response["Location"].endswith(f"#operating-point-{derived.pk}")
    assert (derived.threshold, derived.sensitivity, derived.specificity) == (0.6, 0.5, 1.0)
    assert derived.signed_off_at is None and list(derived.model_versions.all()) == [active_classifier]
    assert derived.validation_cohort == point.validation_cohort and derived.validation["chosen_from"] == point.pk
    assert derived.validation["sensitivity_counts"] == [1, 2] and derived.validation["specificity_counts"] == [2, 2]
    page = client.get(reverse("triage:calibration")).text
    assert f"picked on the curve of operating point {point.pk}" in page
    assert "1 of 2 abnormal exams flagged, 95 % CI 0.013–0.987" in page
    with django_capture_on_commit_callbacks(execute=True):
        signed = client.post(reverse("triage:calibration-sign-off", args=[derived.pk]), HTTP_HX_REQUEST="true")
    assert signed.status_code == 200 and TriageAudit.objects.get(operating_point=derived).after["threshold"] == 0.6


def test_training_patients_are_told_apart_by_issuer(active_classifier) -> None:
    """Synthetic seeds, and unrelated sites, reuse PatientIDs under other issuers: only
    the same PatientID within the same issuer is the same patient."""
    from studies.models import Patient, Study
    from studies.services import cohort_add_studies

    def study(patient_id: str, issuer: str, uid: str) -> Study:
        patient = Patient.objects.create(patient_id=patient_id, issuer_of_patient_id=issuer)
        return Study.objects.create(study_instance_uid=uid, patient=patient)

    trained_on = [study("SYN-0001", "SEED-0", "1.2.1"), study("SYN-0002", "SEED-0", "1.2.2")]
    elsewhere = [study("SYN-0001", "SEED-1", "1.2.3"), study("SYN-0002", "SEED-1", "1.2.4")]
    Cohort.objects.create(name="train-a")
    cohort_add_studies(name="train-a", studies=trained_on)
    active_classifier.metadata = {**active_classifier.metadata, "training": {"cohort": "train-a"}}
    active_classifier.save(update_fields=["metadata"])
    assert services.training_patients([active_classifier], {s.patient_id for s in elsewhere}) == {}
    both = {s.patient_id for s in elsewhere} | {trained_on[0].patient_id}
    assert services.training_patients([active_classifier], both) == {active_classifier.name: 1}


def test_a_new_point_and_a_retired_model_reach_every_unread_study_decided_before(
    settings, mammogram, ingest, active_classifier, admin, user, django_capture_on_commit_callbacks
) -> None:
    """One worklist never mixes two thresholds, and a model taken out of service stops
    ruling studies out. A study already read keeps what it was read with, and a
    radiologist's override stands."""
    from triage.models import StudyRead

    settings.PRECEDENT_TRIAGE_SUSPICIOUS_MALIGNANT = 1.0
    studies = [ingest(mammogram(patient_id=f"P-{n}")).series.study for n in range(3)]
    unread, read, overridden = studies
    with django_capture_on_commit_callbacks(execute=True):
        first = _computed_point(active_classifier, threshold=1.0)  # everything below it: likely negative
        services.operating_point_sign_off(point=first, user=admin)
    assert {s.triage_results.get(is_current=True).category for s in studies} == {Category.LIKELY_NEGATIVE}
    services.study_mark_read(study=read, user=user, read=True)
    services.triage_override(study=overridden, category=Category.SUSPICIOUS, user=user, note="look again")

    with django_capture_on_commit_callbacks(execute=True):
        second = _computed_point(active_classifier, threshold=0.0)  # nothing below it
        services.operating_point_sign_off(point=second, user=admin)
    now = unread.triage_results.get(is_current=True)
    assert (now.category, now.operating_point) == (Category.ROUTINE, second)
    kept = read.triage_results.get(is_current=True)
    assert (kept.category, kept.operating_point) == (Category.LIKELY_NEGATIVE, first)
    assert overridden.triage_results.get(is_current=True).category == Category.SUSPICIOUS
    assert StudyRead.objects.filter(study=read).exists()

    with django_capture_on_commit_callbacks(execute=True):
        services.triage_model_retire(version=active_classifier, user=admin)
    gone = unread.triage_results.get(is_current=True)
    assert gone.category == Category.PENDING and gone.operating_point is None
    assert read.triage_results.get(is_current=True).operating_point == first
    # The command does the same in the foreground: the unread study still waits.
    assert "triaged" in run("triage", "--outdated")
    assert unread.triage_results.get(is_current=True).category == Category.PENDING


def test_the_admin_cannot_delete_triage_rows_on_their_own_but_they_go_with_their_study(
    admin_client, mammogram, ingest, active_classifier, admin, django_capture_on_commit_callbacks
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        services.operating_point_sign_off(point=_computed_point(active_classifier, 0.5), user=admin)
    study = ingest(mammogram()).series.study
    result = study.triage_results.get(is_current=True)
    point = result.operating_point
    for model, pk in (("triageresult", result.pk), ("operatingpoint", point.pk)):
        assert admin_client.get(f"/admin/triage/{model}/{pk}/delete/").status_code == 403
        changelist = f"/admin/triage/{model}/"
        admin_client.post(changelist, {"action": "delete_selected", "_selected_action": [pk], "post": "yes"})
    assert TriageResult.objects.filter(pk=result.pk).exists() and OperatingPoint.objects.filter(pk=point.pk).exists()
    response = admin_client.post(f"/admin/studies/study/{study.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert not Study.objects.filter(pk=study.pk).exists() and not TriageResult.objects.filter(pk=result.pk).exists()


def test_a_point_calibrated_on_other_images_does_not_decide_a_study(
    mammogram, ingest, active_classifier, admin, django_capture_on_commit_callbacks
) -> None:
    """A threshold fitted on chest films says nothing about a mammogram: the study waits,
    and says why, instead of being ruled out by it."""
    point = _computed_point(active_classifier, threshold=1.0)  # would rule everything out
    point.validation = {**point.validation, "tasks": ["chest"]}
    point.save(update_fields=["validation"])
    with django_capture_on_commit_callbacks(execute=True):
        services.operating_point_sign_off(point=point, user=admin)
    result = ingest(mammogram()).series.study.triage_results.get(is_current=True)
    assert result.category == Category.PENDING
    assert "calibrated on chest images only" in result.reasons[0]
    # The same point calibrated on mammograms decides it.
    point.validation = {**point.validation, "tasks": ["mammography"]}
    point.save(update_fields=["validation"])
    assert ingest(mammogram()).series.study.triage_results.get(is_current=True).category == Category.LIKELY_NEGATIVE
