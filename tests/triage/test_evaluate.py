"""Metrics on hand-computable cases, and evaluate_triage end to end on a few MIAS films."""

from __future__ import annotations

import io
import json
import math
import re
import tempfile
from pathlib import Path

import pytest
import torch
from django.core.management import CommandError, call_command

from studies.models import Cohort
from tests.triage.classifier_helpers import import_tiny_cohort
from triage import classifier, metrics, services

# --- metrics ----------------------------------------------------------------------------------


def test_auc_on_known_cases() -> None:
    assert metrics.auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert metrics.auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    # 4 pairs: (0.35>0.1) (0.35<0.4) (0.8>0.1) (0.8>0.4) → 3/4
    assert metrics.auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert metrics.auc([0, 1], [0.5, 0.5]) == 0.5  # a tie counts one half
    assert metrics.auc([1, 1], [0.2, 0.3]) is None


def test_auc_interval_holds_the_estimate_and_narrows_with_more_exams() -> None:
    import numpy as np

    rng = np.random.default_rng(1)

    def exams(n: int) -> tuple[list[int], list[float]]:
        labels = [1] * n + [0] * n
        return labels, list(rng.normal(1.0, 1.0, n)) + list(rng.normal(0.0, 1.0, n))  # true AUC ≈ 0.76

    small, large = exams(10), exams(400)
    low_s, high_s = metrics.auc_interval(*small)
    low_l, high_l = metrics.auc_interval(*large)
    assert low_s <= metrics.auc(*small) <= high_s and low_l <= metrics.auc(*large) <= high_l
    assert high_l - low_l < (high_s - low_s) / 3
    assert low_l < 0.76 < high_l
    assert metrics.auc_interval(*small) == (low_s, high_s)  # seeded: the same interval again
    assert metrics.auc_interval([1, 1], [0.2, 0.3]) is None
    with pytest.raises(ValueError, match="0 < level < 1"):
        metrics.auc_interval(*small, level=1.5)


def test_threshold_for_full_sensitivity_rules_out_the_normals_below_every_abnormal() -> None:
    labels = [0, 0, 0, 0, 1, 1]
    scores = [0.1, 0.2, 0.5, 0.7, 0.3, 0.9]
    point = metrics.threshold_for_sensitivity(labels, scores, 1.0)
    assert point.threshold == 0.3 and point.sensitivity == 1.0
    assert point.specificity == 0.5  # 0.1 and 0.2 of four normals
    assert point.workload_reduction == pytest.approx(2 / 6)
    assert metrics.rule_out_at_full_sensitivity(labels, scores) == 0.5
    half = metrics.threshold_for_sensitivity(labels, scores, 0.5)
    assert half.threshold == 0.9 and half.sensitivity == 0.5 and half.specificity == 1.0
    with pytest.raises(ValueError, match="no abnormal exams"):
        metrics.threshold_for_sensitivity([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="target sensitivity"):
        metrics.threshold_for_sensitivity(labels, scores, 0.0)


def test_curve_runs_from_nothing_flagged_to_everything_flagged() -> None:
    points = metrics.curve([0, 1, 0, 1], [0.1, 0.4, 0.35, 0.8])
    assert math.isinf(points[0].threshold) and points[0].sensitivity == 0.0 and points[0].specificity == 1.0
    assert points[-1].threshold == 0.1 and points[-1].sensitivity == 1.0 and points[-1].specificity == 0.0
    assert [p.sensitivity for p in points] == sorted(p.sensitivity for p in points)
    assert metrics.curve_dicts(points)[0]["threshold"] is None
    png = metrics.plot_curves(points, operating_point=points[2])
    assert png[:4] == b"\x89PNG"


def test_a_one_class_cohort_leaves_the_other_figure_undefined() -> None:
    normals = metrics.at_threshold([0, 0, 0, 0], [0.1, 0.2, 0.6, 0.9], 0.5)
    assert (normals.sensitivity, normals.specificity, normals.workload_reduction) == (None, 0.5, 0.5)
    lesions = metrics.at_threshold([1, 1], [0.1, 0.9], 0.5)
    assert (lesions.sensitivity, lesions.specificity) == (0.5, None)
    metrics.plot_curves(metrics.curve([0, 0], [0.1, 0.9]), operating_point=normals)  # draws, no point


def test_exact_intervals_of_a_proportion() -> None:
    # Clopper-Pearson: all of n has lower bound (alpha/2)^(1/n); 5 of 10 is 0.187-0.813.
    low, high = metrics.proportion_interval(15, 15)
    assert low == pytest.approx(0.025 ** (1 / 15), abs=1e-9) and high == 1.0
    assert metrics.proportion_interval(0, 10) == (0.0, pytest.approx(1 - 0.025 ** (1 / 10), abs=1e-9))
    assert metrics.proportion_interval(5, 10) == (pytest.approx(0.18709, abs=1e-5), pytest.approx(0.81291, abs=1e-5))
    narrow, wide = metrics.proportion_interval(400, 1000), metrics.proportion_interval(4, 10)
    assert wide[0] < narrow[0] < 0.4 < narrow[1] < wide[1]
    assert metrics.proportion_interval(0, 0) is None
    with pytest.raises(ValueError, match="successes <= trials"):
        metrics.proportion_interval(3, 2)


def test_counts_at_a_threshold_carry_their_intervals() -> None:
    counts = metrics.counts_at([1, 1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1, 0.6], 0.5)
    assert counts["sensitivity_counts"] == [2, 3] and counts["specificity_counts"] == [1, 2]
    assert counts["sensitivity_ci95"] == metrics.proportion_interval(2, 3)
    assert metrics.counts_at([0, 0], [0.1, 0.9], 0.5)["sensitivity_ci95"] is None  # no abnormal exam


def test_metrics_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        metrics.auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="3 labels for 2 scores"):
        metrics.auc([0, 1, 1], [0.1, 0.2])


# --- the command -------------------------------------------------------------------------------


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("evaluate_triage", *args, stdout=out)
    return out.getvalue()


@pytest.fixture
def active_classifier(db):
    torch.manual_seed(0)
    model = classifier.build_classifier("resnet18")
    return services.triage_model_register(
        kind="classifier", model=model, meta=classifier.classifier_meta(model), activate=True
    )


@pytest.mark.django_db
def test_evaluate_json_is_one_object_with_the_agreed_keys(datasets: Path, active_classifier, tmp_path: Path) -> None:
    import_tiny_cohort(datasets)
    output = run("--cohort", "tiny", "--json", "--out", str(tmp_path / "eval"))
    result = json.loads(output)  # exactly one JSON object, nothing else on stdout
    assert {
        "auc_abnormal",
        "auc_malignant",
        "rule_out_at_full_sensitivity",
        "operating_point",
        "froc",
        "dice_mean",
    } <= set(result)
    assert set(result["operating_point"]) >= {"sensitivity", "specificity", "workload_reduction"}
    assert result["operating_point"]["signed_off"] is False and result["operating_point"]["threshold"] == 0.5
    flagged, abnormal = result["operating_point"]["sensitivity_counts"]
    assert abnormal == 2 and flagged / abnormal == result["operating_point"]["sensitivity"]
    low, high = result["operating_point"]["sensitivity_ci95"]
    assert low <= result["operating_point"]["sensitivity"] <= high
    assert 0.0 <= result["auc_abnormal"] <= 1.0
    low, high = result["auc_abnormal_ci95"]
    assert 0.0 <= low <= result["auc_abnormal"] <= high <= 1.0
    assert result["auc_malignant"] is None  # the first MIAS lesions are all benign
    assert result["exams"] == 4 and result["abnormal_exams"] == 2 and result["image_level"]["images"] == 8
    assert result["froc"] is None and result["dice_mean"] is None
    assert (tmp_path / "eval" / "roc_workload.png").read_bytes()[:4] == b"\x89PNG"
    text = run("--cohort", "tiny")
    assert "AUC normal vs abnormal" in text and "no signed-off point" in text
    assert f"sensitivity {result['operating_point']['sensitivity']:.3f} ({flagged}/2, 95 % CI {low:.3f}–" in text


@pytest.mark.django_db
def test_evaluate_bad_input(datasets: Path, mammogram, ingest) -> None:
    with pytest.raises(CommandError, match="no cohort named 'nope'"):
        run("--cohort", "nope")
    Cohort.objects.create(name="empty")
    with pytest.raises(CommandError, match="is empty"):
        run("--cohort", "empty")
    import_tiny_cohort(datasets)
    with pytest.raises(CommandError, match="no classifier is active"):
        run("--cohort", "tiny")
    torch.manual_seed(0)
    model = classifier.build_classifier("resnet18")
    services.triage_model_register(
        kind="classifier", model=model, meta=classifier.classifier_meta(model), activate=True
    )
    bare = Cohort.objects.create(name="bare")
    bare.studies.add(ingest(mammogram()).series.study)
    with pytest.raises(CommandError, match="no labelled images"):
        run("--cohort", "bare")


@pytest.mark.django_db
def test_evaluate_reports_froc_and_dice_of_the_active_detector_and_segmenter(
    datasets: Path, active_classifier, tmp_path: Path, monkeypatch, settings
) -> None:
    from tests.triage.test_localise import register_tiny_models
    from triage import detection

    import_tiny_cohort(datasets)
    register_tiny_models()
    # The detector scores the exams and then gives the FROC: one run per image serves both.
    calls = []
    real_detect = detection.detect

    def counted(*args, **kwargs):
        calls.append(1)
        return real_detect(*args, **kwargs)

    monkeypatch.setattr(detection, "detect", counted)
    result = json.loads(run("--cohort", "tiny", "--json", "--out", str(tmp_path / "eval")))
    assert len(calls) == result["image_level"]["images"] == 8
    assert set(result["froc"]) == {"0.5", "1", "2"}
    assert all(0.0 <= value <= 1.0 for value in result["froc"].values())
    # Per lesion class: the tiny cohort's MIAS classes, their lesions adding up.
    by_class = result["froc_by_class"]
    assert by_class and all(set(v) == {"lesions", "0.5", "1", "2"} for v in by_class.values())
    assert sum(v["lesions"] for v in by_class.values()) == result["lesions"]
    assert result["froc_png"] == str(tmp_path / "eval" / "froc.png")
    # Without --out the curves go to PRECEDENT_HOME/evaluations/triage-COHORT, nothing to /tmp.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    default = json.loads(run("--cohort", "tiny", "--json"))
    folder = Path(settings.PRECEDENT_HOME) / "evaluations" / "triage-tiny"
    assert (default["froc_png"], default["roc_png"]) == (str(folder / "froc.png"), str(folder / "roc_workload.png"))
    assert all(Path(default[k]).read_bytes()[:4] == b"\x89PNG" for k in ("froc_png", "roc_png"))
    assert not any((tmp_path / "tmp").iterdir())
    text = run("--cohort", "tiny")
    assert re.search(r"FROC \(0\.5/1/2 false marks per image\): \d\.\d\d/\d\.\d\d/\d\.\d\d \(\d+ lesions\)", text)
    assert re.search(r"FROC by lesion class: \w+ \d\.\d\d/", text)
    assert 0.0 <= result["dice_mean"] <= 1.0
    assert (tmp_path / "eval" / "froc.png").read_bytes()[:4] == b"\x89PNG"


def _import(dataset: str, folder: Path, limit: str) -> None:
    call_command("import_dataset", dataset, str(folder), "--limit", limit, stdout=io.StringIO())


@pytest.mark.django_db
def test_evaluate_on_normals_only_reports_what_is_ruled_out_and_no_sensitivity(
    datasets: Path, active_classifier
) -> None:
    """A second-source set of normals (DDSM): the share ruled out is the figure; a
    sensitivity or a FROC would be made up, so both are n/a, with the detector's false
    marks per image instead."""
    from tests.triage.test_localise import register_tiny_models

    _import("ddsm-normals", datasets / "ddsm-normals-tissue", "4")
    register_tiny_models()
    result = json.loads(run("--cohort", "ddsm-normals", "--json"))
    assert result["exams"] == 4 and result["abnormal_exams"] == 0
    point = result["operating_point"]
    assert point["sensitivity"] is None and 0.0 <= point["specificity"] <= 1.0
    assert point["workload_reduction"] == point["specificity"]  # every exam is a normal one
    assert result["auc_abnormal"] is None and result["rule_out_at_full_sensitivity"] is None
    assert result["froc"] is None and "no lesion box to find in 4 images" in result["froc_note"]
    assert 1 <= result["false_marks_per_image"] <= 3  # the untrained detector always answers, at most 3 boxes
    assert result["breast_level"]["breasts"] == 4 and result["breast_level"]["sensitivity"] is None
    text = run("--cohort", "ddsm-normals")
    assert "sensitivity n/a, specificity" in text and "false marks per image" in text


@pytest.mark.django_db
def test_evaluate_scores_breasts_where_every_exam_is_abnormal(datasets: Path, active_classifier) -> None:
    """Mini-DDSM: each case has a benign lesion in one breast, so exams are all
    abnormal; the lesion breast against the other breast is what can be measured."""
    _import("mini-ddsm", datasets / "mini-ddsm-benign-sample", "4")  # one case, four views
    result = json.loads(run("--cohort", "mini-ddsm", "--json", "--score", "classifier"))
    assert result["exams"] == 1 and result["abnormal_exams"] == 1 and result["auc_abnormal"] is None
    assert result["operating_point"]["specificity"] is None
    breasts = result["breast_level"]
    assert (breasts["breasts"], breasts["abnormal_breasts"]) == (2, 1)
    assert breasts["auc_abnormal"] in (0.0, 0.5, 1.0)
    assert breasts["sensitivity"] in (0.0, 1.0) and breasts["specificity"] in (0.0, 1.0)
