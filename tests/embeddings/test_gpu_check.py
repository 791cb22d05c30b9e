"""bench/gpu_check.py, the one script a lent GPU machine runs, works end to end on the CPU
with small sizes (so device time is never spent finding a bug in it)."""

from __future__ import annotations

import json
import subprocess
import sys

from precedent.paths import REPO_ROOT


def test_gpu_check_runs_on_the_cpu_and_reports_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run(
        [
            sys.executable, str(REPO_ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--archs", "resnet18",
            "--images", "4", "--batch", "2", "--size", "64", "--n", "3000", "--dim", "32", "--queries", "16",
            "--single", "4", "--query-batch", "8", "--films", "4", "--film-side", "512", "--triage-input", "512",
            "--steps", "2", "--index-on-cpu", "--index-n", "2000", "--workers", "0", "1", "--worker-films", "4",
            "--json", str(out),
        ],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["environment"]["device"] == "cpu" and report["environment"]["torch"]
    (encoder,) = report["encoders"]
    assert encoder["arch"] == "resnet18" and encoder["images"] == 4 and encoder["images_per_s"] > 0
    (search,) = report["search"]  # fp16 and faiss-GPU rows appear on a GPU only
    assert search["engine"] == "torch exact float32" and search["vectors"] == 3000
    assert search["recall_at_10_vs_fp32"] == 1.0 and 0 < search["p50_ms"] <= search["p99_ms"]
    encoder_run, classifier, detector, segmenter = report["training"]
    assert encoder_run["model"] == "encoder" and encoder_run["films_per_s"] > 0 and encoder_run["loss"] > 0
    assert classifier["model"] == "classifier" and classifier["films"] == 4 and classifier["films_per_s"] > 0
    assert detector["model"] == "detector" and detector["steps"] == 2 and detector["steps_per_s"] > 0
    assert segmenter["model"] == "segmenter" and segmenter["steps"] == 2 and segmenter["steps_per_s"] > 0
    # The VectorIndex check, CPU against CPU here (the GPU mirror needs faiss-gpu): every
    # operation ran and agreed, and nothing removed or excluded came back.
    index = report["index"]
    assert index["use_gpu"] is False and index["vectors"] == 2000 and index["ok"] is True
    checks = index["checks"]
    assert checks["exclude 200 ids"]["forbidden_returned"] == 0 and checks["after removing 1%"]["recall"] == 1.0
    assert checks["near_copy_first"] == 1.0 and checks["searches_during_adds"]["errors"] == []
    assert checks["saved and loaded"]["count"] == 2000 - index["removed"] + 2 * 16
    assert set(index["upkeep_ms"]) == {"first_search", "next_search", "after_a_removal", "after_an_add"}
    assert all(ms > 0 for ms in index["upkeep_ms"].values())
    assert [row["workers"] for row in report["encoder_workers"]] == [0, 1]
    assert all(row["films"] == 4 and row["films_per_s"] > 0 for row in report["encoder_workers"])
    assert "train encoder,  1 augmenting workers" in result.stdout
    assert (
        "encoder resnet18" in result.stdout
        and "torch exact float32" in result.stdout
        and "VectorIndex" in result.stdout
    )
    for model in ("encoder", "classifier", "detector", "segmenter"):
        assert f"train {model}" in result.stdout
