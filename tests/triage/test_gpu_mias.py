"""bench/gpu_mias.py, the cross-validated MIAS run for a lent GPU, works end to end on the
CPU with small sizes on the real films (so device time is never spent finding a bug in
it), and its folds are patient-level."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from precedent.paths import REPO_ROOT

SCRIPT = REPO_ROOT / "bench" / "gpu_mias.py"
SMALL = [
    "--device", "cpu", "--folds", "2", "--patients", "8", "--minutes", "0.01", "--input-size", "512",
    "--patch-size", "64", "--detector-crop", "96", "--detector-batch", "2", "--segmenter-size", "64",
    "--segmenter-crop", "0", "--segmenter-batch", "4", "--classifier-batch", "4", "--chance-seeds", "3",
    "--threads", "2", "--processes", "1",
]  # fmt: skip


def _script():
    spec = importlib.util.spec_from_file_location("gpu_mias", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_mias"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run(datasets: Path, tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "mias.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--data", str(datasets / "mini-mias"), *SMALL, *extra, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result, json.loads(out.read_text())


def test_folds_hold_out_every_patient_once_with_both_films_together(datasets: Path) -> None:
    module = _script()
    films = module.load_films(datasets / "mini-mias")
    folds = module.patient_folds(films, 5, seed=0)
    assert set(folds) == {f.patient for f in films} and set(folds.values()) == set(range(5))
    # Stratified: each fold holds a fifth of the patients with an abnormal film (±1).
    abnormal = {f.patient for f in films if f.abnormal}
    per_fold = [sum(1 for p in abnormal if folds[p] == k) for k in range(5)]
    assert max(per_fold) - min(per_fold) <= 1, per_fold
    # MIAS films mdb(2k-1) and mdb(2k) are one woman: one patient, one fold.
    assert films[0].patient == films[1].patient and films[0].laterality != films[1].laterality
    assert module.patient_folds(films, 5, seed=0) == folds and module.patient_folds(films, 5, seed=1) != folds


def test_every_model_trains_and_is_scored_on_held_out_patients(datasets: Path, tmp_path: Path) -> None:
    _, report = _run(datasets, tmp_path, "--out", str(tmp_path / "plots"))
    assert (report["films"], report["patients"], report["errors"]) == (16, 8, [])
    for task in ("classifier", "detector", "segmenter"):
        assert sorted(run["fold"] for run in report["training"][task]) == [0, 1]
    # Every exam was scored by the model of the fold that held it out.
    assert report["classifier"]["exams"] == report["detector"]["exam"]["exams"] == report["fused"]["exams"] == 8
    with open(datasets / "mini-mias" / "images.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    patients = list(dict.fromkeys(r["patient_id"] for r in rows))[:8]  # --patients 8: the first 8 listed
    rows = [r for r in rows if r["patient_id"] in patients]
    wanted = {r["refnum"] for r in rows}
    abnormal = {r["patient_id"] for r in rows if r["label"] == "abnormal"}
    assert report["classifier"]["abnormal_exams"] == len(abnormal) and len(report["classifier"]["per_fold"]) == 2
    with open(datasets / "mini-mias" / "annotations.csv", newline="") as handle:
        lesions = [r for r in csv.DictReader(handle) if r["refnum"] in wanted and r["bbox_x0"]]
    assert report["detector"]["froc"]["lesions"] == len(lesions) > 0
    assert set(report["detector"]["froc"]["sensitivity_at"]) == {"0.5", "1", "2"}
    assert 0.0 <= report["segmenter"]["breast_dice_mean"] <= 1.0 and report["segmenter"]["lesion_images"] > 0
    for name in ("classifier_trunk", "raw_pixels_32", "chance"):
        assert set(report["retrieval"][name]["precision_at"]) == {"1", "5", "10"}
    assert report["retrieval"]["classifier_trunk"]["queries"] == 16
    for png in ("froc.png", "roc_classifier.png", "roc_detector.png", "roc_fused.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:4] == b"\x89PNG"


def test_a_failed_training_is_reported_and_the_run_still_ends(datasets: Path, tmp_path: Path) -> None:
    result, report = _run(datasets, tmp_path, "--tasks", "detector", "--detector-arch", "no-such-arch")
    assert [(e["task"], e["fold"]) for e in sorted(report["errors"], key=lambda e: e["fold"])] == [
        ("detector", 0),
        ("detector", 1),
    ]
    assert "unknown detector architecture 'no-such-arch'" in report["errors"][0]["error"]
    assert "detector" not in report and "2 training(s) failed" in result.stdout


def test_weighted_box_fusion_keeps_what_members_agree_on_and_discounts_the_rest() -> None:
    fuse = _script().fuse_boxes
    agreed_a, agreed_b = [0.8, 10, 10, 50, 50], [0.6, 12, 12, 52, 52]  # IoU 0.82
    lone = [0.9, 200, 200, 240, 240]
    fused = fuse([[agreed_a, lone], [agreed_b]])
    assert len(fused) == 2
    # Found by both: the mean of the two scores, the box their score-weighted mean.
    assert fused[0] == pytest.approx([0.7, *[10 + 2 * 0.6 / 1.4] * 2, *[50 + 2 * 0.6 / 1.4] * 2])
    # Found by one member of two: half its score, its own box.
    assert fused[1] == pytest.approx([0.45, 200, 200, 240, 240])
    # A member's second box in the same place does not count twice.
    assert fuse([[agreed_a, [0.7, 11, 11, 51, 51]], []])[0][0] == pytest.approx(0.4)
    assert fuse([]) == [] and fuse([[], []]) == []


def test_an_ensemble_reports_each_member_and_then_their_combination(datasets: Path, tmp_path: Path) -> None:
    result, report = _run(datasets, tmp_path, "--tasks", "classifier", "detector", "--members", "2")
    assert report["errors"] == []
    assert [(m["member"], m["seed"]) for m in report["members"]] == [(0, 0), (1, 1000)]
    assert sorted((r["member"], r["fold"]) for r in report["training"]["classifier"]) == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
    ]
    for m in report["members"]:
        assert 0.0 <= m["classifier_auc"] <= 1.0 and set(m["detector_froc"]) == {"0.5", "1", "2"}
    # The ensemble's figures cover every exam once, as a single model's would.
    assert report["classifier"]["exams"] == report["detector"]["exam"]["exams"] == 8
    assert report["classifier_asymmetry"]["exams"] == 8
    assert "the figures above the member lines are the 2-member ensemble's" in result.stdout
    # The two members differ (their seeds do), so the ensemble is not just member 0.
    assert report["members"][0] != {**report["members"][1], "member": 0, "seed": 0}
