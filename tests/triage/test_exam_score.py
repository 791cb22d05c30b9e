"""The exam score's source (classifier, detector, fused): the pure computation, calibration
storing the source with its model versions, triage on arrival using the signed-off
point's source, and evaluate_triage reporting it. Real PostgreSQL, real MIAS films, real
(small, untrained, seeded) torch models."""

from __future__ import annotations

import io
import json

import pytest
import torch
from django.core.management import CommandError, call_command
from django.utils import timezone

from studies.models import Cohort
from triage import classifier, detection, exam_score, selectors, services
from triage.models import Category, Detection, OperatingPoint, TriageModelVersion, TriageResult

# --- the pure computation ---------------------------------------------------------------------


def test_fuse_is_noisy_or_and_never_below_either_model() -> None:
    assert exam_score.fuse(0.0, 0.0) == 0.0
    assert exam_score.fuse(0.5, 0.5) == pytest.approx(0.75)
    assert exam_score.fuse(0.2, 0.0) == pytest.approx(0.2)
    assert exam_score.fuse(0.0, 0.9) == pytest.approx(0.9)
    assert exam_score.fuse(1.0, 0.3) == 1.0
    for p, q in [(0.1, 0.7), (0.4, 0.4), (0.95, 0.01)]:
        assert exam_score.fuse(p, q) >= max(p, q)
    # Both models a little suspicious rank above one model alone at the same level.
    assert exam_score.fuse(0.3, 0.3) > exam_score.fuse(0.3, 0.0)
    with pytest.raises(ValueError, match="p_detector must be in"):
        exam_score.fuse(0.5, 1.5)
    with pytest.raises(ValueError, match="p_classifier must be in"):
        exam_score.fuse(float("nan"), 0.5)


def test_exam_score_per_source_and_missing_evidence() -> None:
    assert exam_score.detector_score([]) == 0.0  # no box: nothing above the detector's floor
    assert exam_score.detector_score([0.2, 0.7, 0.1]) == 0.7
    assert exam_score.exam_score("classifier", p_classifier=0.3, p_detector=0.9) == 0.3
    assert exam_score.exam_score("detector", p_classifier=0.3, p_detector=0.9) == 0.9
    assert exam_score.exam_score("fused", p_classifier=0.3, p_detector=0.9) == pytest.approx(0.93)
    assert exam_score.exam_score("classifier", p_classifier=None, p_detector=0.9) is None
    assert exam_score.exam_score("detector", p_classifier=0.3, p_detector=None) is None
    assert exam_score.exam_score("fused", p_classifier=0.3, p_detector=None) is None
    with pytest.raises(ValueError, match="score source must be one of"):
        exam_score.exam_score("mean", p_classifier=0.3, p_detector=0.9)
    assert tuple(OperatingPoint.ScoreSource.values) == exam_score.SOURCES


def test_study_scores_keep_the_evidence_the_source_uses() -> None:
    combined = classifier.combine(
        [classifier.ImageScore("1.1", "L", 0.4, 0.1), classifier.ImageScore("1.2", "R", 0.2, 0.0)]
    )
    boxes = {"1.1": 0.0, "1.2": 0.6}
    cls = exam_score.study_scores("classifier", classifier=combined, detector_images=boxes)
    assert cls["score_source"] == "classifier" and cls["exam"]["score"] == 0.4
    assert "p_detector" not in cls["exam"] and "detector_images" not in cls
    det = exam_score.study_scores("detector", classifier=None, detector_images=boxes)
    assert det["exam"] == {"p_detector": 0.6, "score": 0.6} and det["detector_images"] == boxes
    fused = exam_score.study_scores("fused", classifier=combined, detector_images=boxes)
    assert fused["exam"]["score"] == pytest.approx(1 - 0.6 * 0.4)
    assert fused["exam"]["p_abnormal"] == 0.4 and fused["exam"]["p_detector"] == 0.6
    assert set(fused["images"]) == {"1.1", "1.2"}
    assert exam_score.study_scores("fused", classifier=combined, detector_images=None) is None
    assert exam_score.study_scores("classifier", classifier=None, detector_images=boxes) is None
    assert exam_score.study_scores("detector", classifier=combined, detector_images={}) == {
        "exam": {"p_detector": 0.0, "score": 0.0},
        "detector_images": {},
        "score_source": "detector",
    }


def test_decide_thresholds_the_source_score_and_says_which() -> None:
    rules = services.urgent_rules()
    images = [services.ImageVerdict(True)]
    scores = exam_score.study_scores("detector", classifier=None, detector_images={"1.1": 0.3})
    state = services.ModelState(detector="det-1", operating_point=True, threshold=0.2, score_source="detector")
    routine = services.decide(images=images, findings=[], rules=rules, models=state, scores=scores)
    assert routine.category == Category.ROUTINE
    assert routine.reasons[0].startswith("detector det-1: best box score 0.300 at or above the signed-off threshold")
    state = services.ModelState(detector="det-1", operating_point=True, threshold=0.31, score_source="detector")
    negative = services.decide(images=images, findings=[], rules=rules, models=state, scores=scores)
    assert negative.category == Category.LIKELY_NEGATIVE
    assert negative.reasons == ["detector det-1: best box score 0.300 below the signed-off threshold 0.310"]
    waiting = services.decide(
        images=images, findings=[], rules=rules, models=services.ModelState(detector="det-1"), scores=None
    )
    assert waiting.category == Category.PENDING
    assert waiting.reasons[0] == "no operating point is signed off for detector det-1 yet"


# --- models, calibration, arrival, evaluation ------------------------------------------------------


def run(name: str, *args: str) -> str:
    out = io.StringIO()
    call_command(name, *args, stdout=out)
    return out.getvalue()


def register_classifier() -> TriageModelVersion:
    torch.manual_seed(0)
    model = classifier.build_classifier("resnet18")
    return services.triage_model_register(
        kind="classifier", model=model, meta=classifier.classifier_meta(model), activate=True
    )


def register_detector(name: str = "", seed: int = 0, activate: bool = True) -> TriageModelVersion:
    """A small untrained FCOS that always answers (score floor 0): real, distinct box scores."""
    torch.manual_seed(seed)
    config = {"arch": "fcos-resnet18", "input_size": 160, "fpn_channels": 64, "head_convs": 1}
    config.update(score_thresh=0.0, nms_thresh=0.3, detections_per_img=3)
    meta = detection.make_meta(["CIRC"], config, training={"tasks": ["mammography"]})
    return services.triage_model_register(
        kind="detector", model=detection.build(["CIRC"], **config), meta=meta, name=name, activate=activate
    )


def expected_exam_scores(cohort: Cohort, detector_version: TriageModelVersion) -> tuple[list[int], dict[str, list]]:
    """Exam labels and scores per source, computed here straight from the models (not
    through the selectors under test)."""
    loaded_cls = services.active_triage_model("classifier")
    loaded_det = services.load_triage_model(detector_version)
    by_study: dict[int, list] = {}
    for item in selectors.labelled_images(cohort=cohort):
        pixels, mono = selectors.decode_instance(item.instance)
        p_abnormal = float(classifier.score_images(loaded_cls.module, [pixels], monochrome1=[mono])[0][0])
        boxes = detection.detect(loaded_det.module, loaded_det.meta, pixels, monochrome1=mono)
        best = max((b.score for b in boxes), default=0.0)
        by_study.setdefault(item.instance.series.study_id, []).append((item.abnormal, p_abnormal, best))
    labels, scores = [], {"classifier": [], "detector": [], "fused": []}
    for images in by_study.values():
        labels.append(int(any(a for a, _, _ in images)))
        p_cls, p_det = max(p for _, p, _ in images), max(d for _, _, d in images)
        scores["classifier"].append(p_cls)
        scores["detector"].append(p_det)
        scores["fused"].append(1 - (1 - p_cls) * (1 - p_det))
    return labels, scores


@pytest.mark.django_db
def test_calibration_stores_the_source_and_its_versions_and_evaluate_reports_it(
    pair: Cohort, admin, django_capture_on_commit_callbacks
) -> None:
    cohort = pair
    detector = register_detector()
    # Detector only: its own score calibrates and evaluates; fused needs a classifier and says so.
    assert services.default_score_source() == "detector"
    with pytest.raises(CommandError, match="no classifier is active \\(the fused score needs one\\)"):
        run("calibrate_triage", "--cohort", "pair", "--score", "fused")
    only_detector = json.loads(run("evaluate_triage", "--cohort", "pair", "--json"))
    assert only_detector["score_source"] == "detector" and only_detector["classifier"] is None
    assert only_detector["auc_malignant"] is None and set(only_detector["by_source"]) == {"detector"}
    output = run("calibrate_triage", "--cohort", "pair", "--score", "detector")
    on_detector = OperatingPoint.objects.get()
    assert f"on the {exam_score.LABELS['detector']} ({detector.name})" in output

    cls = register_classifier()
    assert services.default_score_source() == "detector"  # measured best on validation (README)
    run("calibrate_triage", "--cohort", "pair", "--score", "fused")
    on_fused = OperatingPoint.objects.latest("pk")
    labels, expected = expected_exam_scores(cohort, detector)
    assert labels.count(1) == 1 and len(labels) == 2
    for point, source, versions in [(on_detector, "detector", {detector}), (on_fused, "fused", {cls, detector})]:
        assert point.score_source == source and point.validation["score_source"] == source
        assert set(point.model_versions.all()) == versions
        # Full sensitivity: the threshold is the abnormal exam's score under that source.
        assert point.threshold == pytest.approx(expected[source][labels.index(1)], abs=1e-5)
    assert on_fused.threshold > on_detector.threshold  # noisy-OR adds the classifier's evidence

    # The signed-off point's source is what evaluate_triage reports, the others alongside.
    with django_capture_on_commit_callbacks(execute=True):
        services.operating_point_sign_off(point=on_detector, user=admin)
    result = json.loads(run("evaluate_triage", "--cohort", "pair", "--json"))
    assert result["score_source"] == "detector" and result["operating_point"]["score_source"] == "detector"
    assert result["operating_point"]["id"] == on_detector.pk and result["operating_point"]["signed_off"]
    assert result["operating_point"]["threshold"] == on_detector.threshold
    assert result["operating_point"]["sensitivity"] == 1.0  # the calibration cohort itself
    assert set(result["by_source"]) == {"classifier", "detector", "fused"}
    assert result["auc_abnormal"] == result["by_source"]["detector"]["auc_abnormal"]
    assert result["auc_abnormal"] == on_detector.validation["auc_abnormal"]
    assert result["classifier"] == cls.name and result["detector"] == detector.name
    # Another score than the point's: evaluated at --threshold, not under the point.
    fused = json.loads(run("evaluate_triage", "--cohort", "pair", "--score", "fused", "--threshold", "0", "--json"))
    assert fused["score_source"] == "fused" and fused["operating_point"]["signed_off"] is False
    assert fused["operating_point"]["threshold"] == 0.0 and fused["operating_point"]["sensitivity"] == 1.0
    assert fused["auc_abnormal"] == result["by_source"]["fused"]["auc_abnormal"]
    text = run("evaluate_triage", "--cohort", "pair", "--score", "fused")
    assert f"note: the signed-off point {on_detector.pk} thresholds the detector score, not this one" in text
    assert fused["training_patients"] == {}  # untrained models: no training cohort


@pytest.mark.django_db
def test_evaluate_a_candidate_detector_without_activating_it(pair: Cohort, admin) -> None:
    cohort = pair
    register_classifier()
    live = register_detector(name="live", seed=0)
    run("calibrate_triage", "--cohort", "pair", "--score", "detector", "--sign-off", admin.username)
    candidate = register_detector(name="candidate", seed=5, activate=False)

    result = json.loads(run("evaluate_triage", "--cohort", "pair", "--detector", "candidate", "--json"))
    assert result["detector"] == "candidate" and result["not_active"] == ["candidate"]
    # The live detector's signed-off threshold means nothing for the candidate's scores.
    assert result["operating_point"]["signed_off"] is False and result["operating_point"]["id"] is None
    labels, expected = expected_exam_scores(cohort, candidate)
    from triage import metrics

    assert result["auc_abnormal"] == pytest.approx(metrics.auc(labels, expected["detector"]))
    assert result["lesions"] == 2 and result["froc"] is not None  # FROC of the candidate's boxes
    text = run("evaluate_triage", "--cohort", "pair", "--detector", "candidate")
    assert "detector candidate (not active)" in text
    # Nothing changed for triage: the live detector still serves, under its signed-off point.
    live.refresh_from_db()
    candidate.refresh_from_db()
    assert live.status == "active" and candidate.status != "active"
    assert selectors.signed_off_point() is not None
    as_live = json.loads(run("evaluate_triage", "--cohort", "pair", "--json"))
    assert as_live["detector"] == "live" and as_live["not_active"] == [] and as_live["operating_point"]["signed_off"]
    with pytest.raises(CommandError, match="no triage model version named 'nope'"):
        run("evaluate_triage", "--cohort", "pair", "--detector", "nope")
    with pytest.raises(CommandError, match="candidate is a detector, not a classifier"):
        run("evaluate_triage", "--cohort", "pair", "--classifier", "candidate")


def sign_off(point_source: str, versions, threshold: float, admin, capture) -> OperatingPoint:
    point = OperatingPoint.objects.create(
        score_source=point_source,
        threshold=threshold,
        sensitivity=1.0,
        specificity=0.5,
        workload_reduction=0.3,
        validation_cohort=Cohort.objects.create(name=f"val-{point_source}-{threshold}"),
        validation={"exams": 4, "patients": 4, "abnormal_exams": 2, "score_source": point_source},
        computed_at=timezone.now(),
    )
    point.model_versions.set(versions)
    with capture(execute=True):
        services.operating_point_sign_off(point=point, user=admin)
    return point


@pytest.mark.django_db
@pytest.mark.parametrize(("factor", "category"), [(1.5, Category.LIKELY_NEGATIVE), (0.5, Category.ROUTINE)])
def test_arrival_uses_the_signed_off_points_source(
    settings, mammogram, ingest, admin, django_capture_on_commit_callbacks, factor, category
) -> None:
    settings.PRECEDENT_TRIAGE_SUSPICIOUS_MALIGNANT = 1.0
    settings.PRECEDENT_TRIAGE_SUSPICIOUS_DETECTION_SCORE = 1.0
    detector = register_detector()  # no classifier: a detector-only setup
    instance = ingest(mammogram(patient_id="P-1"))
    study = instance.series.study
    assert study.triage_results.get(is_current=True).category == Category.PENDING
    best = max(Detection.objects.filter(instance=instance, model_version=detector).values_list("score", flat=True))
    assert best > 0

    point = sign_off("detector", [detector], best * factor, admin, django_capture_on_commit_callbacks)
    result = study.triage_results.get(is_current=True)
    assert result.category == category and result.operating_point == point
    assert result.scores["score_source"] == "detector"
    assert result.scores["exam"]["score"] == pytest.approx(best, abs=1e-6)
    assert result.scores["detector_images"] == {instance.sop_instance_uid: pytest.approx(best, abs=1e-6)}
    assert "p_abnormal" not in result.scores["exam"]
    assert result.reasons[0].startswith(f"detector {detector.name}: best box score {best:.3f}")
    assert list(result.model_versions.all()) == [detector]

    # A classifier activated later leaves the threshold on the detector's score, and
    # scores beside it: its P(malignant) can flag the exam, its scores are recorded.
    cls = register_classifier()
    expected = services.classify_study(study, services.active_triage_model("classifier"))
    services.triage_study(study_id=study.pk)
    result = study.triage_results.get(is_current=True)
    assert result.scores["score_source"] == "detector" and result.category == category
    assert result.scores["exam"]["score"] == pytest.approx(best, abs=1e-6)
    assert result.scores["exam"]["p_malignant"] == pytest.approx(expected["exam"]["p_malignant"], abs=1e-6)
    assert set(result.scores["images"]) == {instance.sop_instance_uid} and set(result.model_versions.all()) == {
        detector,
        cls,
    }
    settings.PRECEDENT_TRIAGE_SUSPICIOUS_MALIGNANT = expected["exam"]["p_malignant"] / 2
    services.triage_study(study_id=study.pk)
    result = study.triage_results.get(is_current=True)
    assert result.category == Category.SUSPICIOUS and "P(malignant)" in result.reasons[0]


@pytest.mark.django_db
def test_arrival_with_a_fused_point_and_a_point_that_no_longer_applies(
    settings, mammogram, ingest, admin, django_capture_on_commit_callbacks
) -> None:
    settings.PRECEDENT_TRIAGE_SUSPICIOUS_MALIGNANT = 1.0
    settings.PRECEDENT_TRIAGE_SUSPICIOUS_DETECTION_SCORE = 1.0
    cls, detector = register_classifier(), register_detector()
    instance = ingest(mammogram())
    study = instance.series.study
    p_cls = services.classify_study(study, services.active_triage_model("classifier"))["exam"]["p_abnormal"]
    p_det = max(Detection.objects.filter(instance=instance).values_list("score", flat=True))
    fused = 1 - (1 - p_cls) * (1 - p_det)
    # Between the classifier's P(abnormal) and the fused score: only the fused score is above it.
    threshold = (max(p_cls, p_det) + fused) / 2
    sign_off("classifier", [cls], threshold, admin, django_capture_on_commit_callbacks)
    assert study.triage_results.get(is_current=True).category == Category.LIKELY_NEGATIVE
    point = sign_off("fused", [cls, detector], threshold, admin, django_capture_on_commit_callbacks)
    services.triage_study(study_id=study.pk)  # the newest signed-off point that applies is used
    result = study.triage_results.get(is_current=True)
    assert result.operating_point == point and result.category == Category.ROUTINE
    assert result.scores["score_source"] == "fused"
    assert result.scores["exam"]["score"] == pytest.approx(fused, abs=1e-5)
    assert result.scores["exam"]["p_abnormal"] == pytest.approx(p_cls, abs=1e-6)
    assert "fused score" in result.reasons[0] and set(result.model_versions.all()) == {cls, detector}

    # A new detector version: the fused point was calibrated on the old one's scores and no
    # longer applies; the classifier's point does again.
    register_detector(name="det-2", seed=1)
    services.triage_study(study_id=study.pk)
    result = study.triage_results.get(is_current=True)
    assert result.scores["score_source"] == "classifier" and result.operating_point.score_source == "classifier"
    # No model at all: the study waits.
    TriageModelVersion.objects.update(status=TriageModelVersion.Status.RETIRED)
    services.triage_study(study_id=study.pk)
    result = TriageResult.objects.get(study=study, is_current=True)
    assert result.category == Category.PENDING and result.reasons == [services.NO_MODEL_REASON]
