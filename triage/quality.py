"""Image-quality check for triage: can this image be assessed by the triage models at all?

Pure numpy and `studies.dicom`, no Django, so the worker, the commands and the tests
use the same rules. Header rules come first and cost nothing (no pixel data, a
modality or body part no triage task covers, a raw "For Processing" mammogram, an
image too small for the task); only an image that passes them is decoded, and then
checked for pixel data that cannot be decoded, a blank (near-constant) image and
heavy clipping. Each failed rule gives one reason a radiologist can read.

Clipping is judged in display orientation (MONOCHROME1 inverted): a large dark area
is normal (the air around a breast is most of many mammograms, the air around a
patient much of a CT slice), so only a dark area covering nearly the whole image
counts, while a bright area counts from half the image (electronic collimator shutters
make a white border that can cover 40 % of a radiograph).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from studies import dicom
from studies.dicom import DicomHeader
from studies.errors import IngestError, RenderError

# Digital Mammography X-Ray Image Storage - For Processing: raw detector data, not
# meant to be read (or scored: models learn from presentation images).
MG_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
# Largest number of pixels the statistics look at: a 4736×2624 film is sampled with a
# stride, which keeps the check at a few milliseconds after decoding.
SAMPLE_PIXELS = 1_000_000


@dataclass(frozen=True)
class Task:
    """What one triage model family can assess: which images, how large at least."""

    name: str
    label: str  # what the image should be, for the reason: "a mammogram"
    modalities: frozenset[str]
    body_parts: frozenset[str]  # "" accepts images that do not say
    min_long_side: int
    excluded_sop_classes: frozenset[str] = frozenset()


TASKS: dict[str, Task] = {
    # The classifier needs ≥ 512 px on the long side to see calcifications and small masses.
    "mammography": Task(
        name="mammography",
        label="a mammogram",
        modalities=frozenset({"MG"}),
        body_parts=frozenset({"BREAST", ""}),
        min_long_side=512,
        excluded_sop_classes=frozenset({MG_FOR_PROCESSING}),
    ),
    "chest": Task(
        name="chest",
        label="a chest radiograph",
        modalities=frozenset({"CR", "DX"}),
        body_parts=frozenset({"CHEST", ""}),
        min_long_side=256,
    ),
}
DEFAULT_TASKS = ("mammography", "chest")


@dataclass(frozen=True)
class Rules:
    """Thresholds of the pixel rules (fractions of the pixels or of the stored range)."""

    blank_spread: float = 0.005  # 0.5–99.5 percentile spread below this share of the stored range
    max_bright_clipped: float = 0.5  # share at the brightest value (collimator shutters are common)
    max_dark_clipped: float = 0.95  # share at the darkest value (background is normal)


@dataclass(frozen=True)
class ImageFacts:
    """What the header says about one image, from a stored Instance or a DicomHeader."""

    modality: str
    body_part: str
    sop_class_uid: str
    has_pixel_data: bool
    rows: int | None
    columns: int | None
    number_of_frames: int = 1
    bits_stored: int | None = None
    photometric_interpretation: str = ""

    @classmethod
    def from_header(cls, header: DicomHeader) -> ImageFacts:
        return cls(
            modality=header.modality,
            body_part=header.body_part,
            sop_class_uid=header.sop_class_uid,
            has_pixel_data=header.has_pixel_data,
            rows=header.rows,
            columns=header.columns,
            number_of_frames=header.number_of_frames,
            bits_stored=header.bits_stored,
            photometric_interpretation=header.photometric_interpretation,
        )


@dataclass(frozen=True)
class Quality:
    """The verdict on one image: assessable for `task`, or not with the reasons."""

    assessable: bool
    task: str = ""
    reasons: tuple[str, ...] = ()
    metrics: dict[str, Any] = field(default_factory=dict)


def tasks_named(names: Sequence[str]) -> list[Task]:
    """The tasks for configured names; raises ValueError for an unknown name."""
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise ValueError(f"unknown triage task {', '.join(unknown)}; known: {', '.join(TASKS)}")
    return [TASKS[name] for name in names]


def check_header(facts: ImageFacts, tasks: Sequence[Task]) -> Quality:
    """The rules that need no pixels. Assessable here means: worth decoding."""
    if not facts.has_pixel_data:
        return Quality(False, reasons=("no pixel data (not an image)",))
    if not (facts.rows and facts.columns):
        return Quality(False, reasons=("no image size in the header",))
    candidates = [task for task in tasks if facts.modality in task.modalities]
    if not candidates:
        wanted = " or ".join(task.label for task in tasks) or "an image any triage task covers"
        return Quality(False, reasons=(f"not {_strip_article(wanted)} (modality {facts.modality or 'unknown'})",))
    reasons: list[str] = []
    for task in candidates:
        task_reasons = _task_reasons(facts, task)
        if not task_reasons:
            return Quality(True, task=task.name)
        reasons.extend(task_reasons)
    return Quality(False, reasons=tuple(dict.fromkeys(reasons)))


def _strip_article(label: str) -> str:
    # "not a mammogram or a chest radiograph" reads better without the second article.
    first, *rest = label.split(" or ")
    return " or ".join([first, *(part.removeprefix("a ").removeprefix("an ") for part in rest)])


def _task_reasons(facts: ImageFacts, task: Task) -> list[str]:
    reasons = []
    if facts.body_part not in task.body_parts:
        expected = "/".join(sorted(part for part in task.body_parts if part))
        reasons.append(f"not {task.label}: body part {facts.body_part}, expected {expected}")
    if facts.sop_class_uid in task.excluded_sop_classes:
        reasons.append("a For Processing (raw detector) image, not one for presentation")
    long_side = max(facts.rows or 0, facts.columns or 0)
    if long_side < task.min_long_side:
        reasons.append(
            f"image too small for {task.name} triage: {facts.columns}×{facts.rows} px"
            f" (needs ≥ {task.min_long_side} px on the long side)"
        )
    return reasons


def check_pixels(pixels: np.ndarray, facts: ImageFacts, rules: Rules = Rules()) -> tuple[list[str], dict[str, Any]]:
    """The pixel rules on one decoded frame: reasons (empty when fine) and the measures."""
    grey = pixels.mean(axis=-1) if pixels.ndim == 3 else pixels
    stride = max(1, int(np.ceil(np.sqrt(grey.size / SAMPLE_PIXELS))))
    sample = np.asarray(grey[::stride, ::stride], dtype=np.float32)
    if facts.photometric_interpretation == "MONOCHROME1":
        sample = -sample  # display orientation: more attenuation is brighter
    lo, hi = float(sample.min()), float(sample.max())
    p_lo, p_hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    stored_range = float(2 ** (8 if pixels.ndim == 3 else facts.bits_stored or 16))
    metrics = {
        "spread": round((p_hi - p_lo) / stored_range, 6),
        "dark_clipped": round(float(np.mean(sample == lo)), 4),
        "bright_clipped": round(float(np.mean(sample == hi)), 4),
    }
    if hi == lo or metrics["spread"] < rules.blank_spread:
        return ["blank image: the pixel values are (nearly) constant"], metrics
    reasons = []
    if metrics["bright_clipped"] > rules.max_bright_clipped:
        reasons.append(f"heavily clipped: {metrics['bright_clipped']:.0%} of the pixels at the brightest value")
    if metrics["dark_clipped"] > rules.max_dark_clipped:
        reasons.append(f"heavily clipped: {metrics['dark_clipped']:.0%} of the pixels at the darkest value")
    return reasons, metrics


def representative_frame(number_of_frames: int) -> int:
    # The middle of a multi-frame acquisition shows the anatomy better than its edge.
    return (max(number_of_frames, 1) + 1) // 2


def assess(facts: ImageFacts, path: Path | str, tasks: Sequence[Task], rules: Rules = Rules()) -> Quality:
    """Every rule on one stored image. Never raises for bad pixel data or a bad file:
    an image that cannot be decoded is not assessable, with the decoder's reason."""
    header_verdict = check_header(facts, tasks)
    if not header_verdict.assessable:
        return header_verdict
    try:
        ds = dicom.read_dataset(path, stop_before_pixels=True)
        pixels = dicom.decode_frame(path, ds, representative_frame(facts.number_of_frames))
    except RenderError as exc:
        return Quality(False, header_verdict.task, (str(exc),))
    except Exception as exc:  # pydicom and the OS raise many kinds for a damaged or missing file
        return Quality(False, header_verdict.task, (f"the stored file cannot be read: {type(exc).__name__}: {exc}",))
    reasons, metrics = check_pixels(pixels, facts, rules)
    return Quality(not reasons, header_verdict.task, tuple(reasons), metrics)


def assess_file(path: Path | str, tasks: Sequence[Task], rules: Rules = Rules()) -> Quality:
    """`assess` for a file on its own (commands, tests): its header read first."""
    try:
        _ds, header = dicom.read_header(path, verify_pixels=False)
    except IngestError as exc:
        return Quality(False, reasons=(exc.reason,))
    return assess(ImageFacts.from_header(header), path, tasks, rules)
