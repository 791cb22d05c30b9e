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
            "--detector-steps", "2", "--json", str(out),
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
    classifier, detector = report["triage_training"]
    assert classifier["model"] == "classifier" and classifier["films"] == 4 and classifier["films_per_s"] > 0
    assert detector["model"] == "detector" and detector["steps"] == 2 and detector["steps_per_s"] > 0
    assert "encoder resnet18" in result.stdout and "torch exact float32" in result.stdout
    assert "train classifier" in result.stdout and "train detector" in result.stdout
