"""The exam score that triage thresholds: which model evidence makes an exam's
"how likely abnormal" number. Pure Python (no Django, no torch): calibration,
triage on arrival and evaluation all compute it here, so a threshold is always
compared with the number it was calibrated on.

Three sources:

- ``classifier``: the whole-image classifier's P(abnormal), max over images and
  breasts (classifier.combine);
- ``detector``: the detector's best box on the exam, max over every box of every
  image it ran on; an exam where it marked nothing scores 0 (no box is the
  detector saying "nothing above its score floor");
- ``fused``: both, by noisy-OR, 1 − (1 − p_classifier)(1 − p_detector): the exam is
  normal only when neither model sees something. Like max it cannot average a
  lesion away (a rule-out must not), unlike max both models still move the score
  (an exam both find a little suspicious ranks above one only one of them does).

The source is stored on the OperatingPoint (and in every TriageResult's scores), so
a threshold calibrated on one source is never applied to another's numbers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

Source = Literal["classifier", "detector", "fused"]
SOURCES: tuple[Source, ...] = ("classifier", "detector", "fused")
# The model kinds (TriageModelVersion.Kind values) each source needs active.
NEEDS: dict[str, tuple[str, ...]] = {
    "classifier": ("classifier",),
    "detector": ("detector",),
    "fused": ("classifier", "detector"),
}
LABELS: dict[str, str] = {
    "classifier": "classifier P(abnormal)",
    "detector": "detector score",
    "fused": "fused score (noisy-OR of classifier and detector)",
}


def check_source(source: str) -> Source:
    if source not in SOURCES:
        raise ValueError(f"score source must be one of {', '.join(SOURCES)}, got {source!r}")
    return source  # type: ignore[return-value]


def _probability(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def detector_score(box_scores: Iterable[float]) -> float:
    """The detector's evidence on one image or exam: its best box, 0 without any."""
    return max((_probability("a detection score", s) for s in box_scores), default=0.0)


def fuse(p_classifier: float, p_detector: float) -> float:
    """Noisy-OR of the classifier's P(abnormal) and the detector's best box score."""
    p_classifier = _probability("p_classifier", p_classifier)
    p_detector = _probability("p_detector", p_detector)
    return 1.0 - (1.0 - p_classifier) * (1.0 - p_detector)


def exam_score(source: str, *, p_classifier: float | None, p_detector: float | None) -> float | None:
    """The exam's score under `source`, or None when evidence the source needs is
    missing (the model did not score the exam): such an exam cannot be ruled out."""
    source = check_source(source)
    if source == "classifier":
        return None if p_classifier is None else _probability("p_classifier", p_classifier)
    if source == "detector":
        return None if p_detector is None else _probability("p_detector", p_detector)
    if p_classifier is None or p_detector is None:
        return None
    return fuse(p_classifier, p_detector)


def study_scores(
    source: str,
    *,
    classifier: dict[str, Any] | None,
    detector_images: dict[str, float] | None,
) -> dict[str, Any] | None:
    """The scores a TriageResult stores and the threshold is compared with, built the
    same way on arrival and in calibration: `classifier` is classifier.combine's
    output (None: not scored), `detector_images` the best box score per image the
    detector ran on (None: it ran on none). Only the evidence the source uses is
    kept; `exam.score` is the number the threshold applies to. None when the source
    lacks evidence."""
    source = check_source(source)
    needs = NEEDS[source]
    if ("classifier" in needs and classifier is None) or ("detector" in needs and detector_images is None):
        return None
    scores: dict[str, Any] = dict(classifier) if "classifier" in needs and classifier is not None else {}
    exam = dict(scores.get("exam", {}))
    p_detector = None
    if "detector" in needs and detector_images is not None:
        p_detector = round(detector_score(detector_images.values()), 6)
        exam["p_detector"] = p_detector
        scores["detector_images"] = {key: round(float(v), 6) for key, v in sorted(detector_images.items())}
    score = exam_score(source, p_classifier=exam.get("p_abnormal"), p_detector=p_detector)
    exam["score"] = round(float(score), 6)  # type: ignore[arg-type]  # not None: the evidence is there
    scores["exam"] = exam
    scores["score_source"] = source
    return scores
