"""Localisation metrics: FROC for detections against lesion boxes, Dice for masks.
Pure numpy (matplotlib for the plot); no Django, no torch.

FROC (free-response ROC): lesion sensitivity against the mean number of false marks
per image as the score threshold falls. Rules, stated because FROC numbers are only
comparable with them:
- a detection *hits* a lesion when their IoU is at least HIT_IOU (0.1) or the
  detection's centre lies inside the lesion's box (lenient on purpose: a small mark on
  a large circular MIAS lesion, or a large mark around a small calcification cluster,
  points the reader at the right place);
- a lesion counts as found when any detection at or above the threshold hits it;
- a detection that hits some lesion is never a false mark, even when another
  detection hit that lesion first (no double penalty for two marks on one lesion);
- false marks per image divide by every image, lesion-free ones included;
- per class (`froc(cases, lesion_class=...)`, `froc_by_class`), sensitivity counts
  that class's lesions at the false-mark rate of all marks: a mark on a lesion of
  another class is neither a find nor a false mark.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HIT_IOU = 0.1
FROC_RATES = (0.5, 1.0, 2.0)

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ImageCase:
    detections: Sequence[tuple[float, Box]]  # (score, box)
    lesions: Sequence[Box]
    lesion_classes: Sequence[str] = ()  # one per lesion, when per-class figures are wanted


@dataclass
class FrocCurve:
    thresholds: list[float] = field(default_factory=list)
    sensitivity: list[float] = field(default_factory=list)
    false_marks_per_image: list[float] = field(default_factory=list)
    lesions: int = 0
    images: int = 0


def iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def hits(detection: Box, lesion: Box, min_iou: float = HIT_IOU) -> bool:
    cx, cy = (detection[0] + detection[2]) / 2, (detection[1] + detection[3]) / 2
    inside = lesion[0] <= cx < lesion[2] and lesion[1] <= cy < lesion[3]
    return inside or iou(detection, lesion) >= min_iou


def froc(cases: Sequence[ImageCase], *, lesion_class: str | None = None) -> FrocCurve:
    """The FROC curve, one point per distinct score (highest first); with
    `lesion_class`, the sensitivity for that class's lesions only."""
    marks: list[tuple[float, int, list[int]]] = []  # score, image, lesion ids hit
    counted: set[int] = set()  # the lesion ids the sensitivity is over
    offset = 0
    for image, case in enumerate(cases):
        if lesion_class is not None and len(case.lesion_classes) != len(case.lesions):
            raise ValueError("per-class FROC needs a class for every lesion")
        for j in range(len(case.lesions)):
            if lesion_class is None or case.lesion_classes[j] == lesion_class:
                counted.add(offset + j)
        for score, box in case.detections:
            hit = [offset + j for j, lesion in enumerate(case.lesions) if hits(box, lesion)]
            marks.append((float(score), image, hit))
        offset += len(case.lesions)
    curve = FrocCurve(lesions=len(counted), images=len(cases))
    if not cases:
        return curve
    marks.sort(key=lambda m: -m[0])
    found: set[int] = set()
    false_marks = 0
    for n, (score, _, hit) in enumerate(marks):
        if hit:
            found.update(counted.intersection(hit))
        else:
            false_marks += 1
        if n + 1 < len(marks) and marks[n + 1][0] == score:
            continue  # ties enter together
        curve.thresholds.append(score)
        curve.sensitivity.append(len(found) / len(counted) if counted else 0.0)
        curve.false_marks_per_image.append(false_marks / len(cases))
    return curve


def froc_by_class(cases: Sequence[ImageCase]) -> dict[str, FrocCurve]:
    """One curve per lesion class present (sorted by class name)."""
    classes = sorted({c for case in cases for c in case.lesion_classes})
    return {c: froc(cases, lesion_class=c) for c in classes}


def sensitivity_at(curve: FrocCurve, false_marks_per_image: float) -> float:
    """The best sensitivity reached with at most that many false marks per image
    (0 when even the highest threshold makes more)."""
    best = 0.0
    for sens, rate in zip(curve.sensitivity, curve.false_marks_per_image, strict=True):
        if rate <= false_marks_per_image + 1e-12:
            best = max(best, sens)
    return best


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary masks; two empty masks agree perfectly (1.0)."""
    p, t = predicted.astype(bool), truth.astype(bool)
    total = int(p.sum()) + int(t.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, t).sum()) / total


def plot_froc(
    curve: FrocCurve, path: Path | str, *, title: str = "FROC", by_class: dict[str, FrocCurve] | None = None
) -> Path:
    """The FROC curve with its 0.5/1/2 points marked; `by_class` adds a thin dashed
    curve per lesion class (`froc_by_class`), its lesion count in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    ax.step([0.0, *curve.false_marks_per_image], [0.0, *curve.sensitivity], where="post", color="#1f6feb", label="all")
    for label, part in (by_class or {}).items():
        if part.lesions:
            ax.step(
                [0.0, *part.false_marks_per_image],
                [0.0, *part.sensitivity],
                where="post",
                linestyle="--",
                linewidth=1,
                label=f"{label} ({part.lesions})",
            )
    for rate in FROC_RATES:
        sens = sensitivity_at(curve, rate)
        ax.plot([rate], [sens], "o", color="#d1242f")
        ax.annotate(f"{sens:.2f}", (rate, sens), textcoords="offset points", xytext=(4, -12), fontsize=8)
    ax.set_xlim(0, 4.0)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false marks per image")
    ax.set_ylabel("lesion sensitivity")
    ax.set_title(f"{title}\n{curve.lesions} lesions, {curve.images} images", fontsize=9)
    ax.grid(alpha=0.3)
    if by_class:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
