"""Detector and segmenter services: train them on a cohort, run them on arriving
studies, evaluate them. triage/services.py exposes these under the shared names
(`train_detector`, `train_segmenter`, `localise_study`, `evaluate_localisation`) and
imports this module lazily, so a process that only serves the worklist never loads
torch.

Stored output is model output, never ground truth: Detection rows (boxes in image
pixels) and SegmentationMask rows whose PNGs live under PRECEDENT_HOME/masks/triage/.
A LocalisationRun row says a model version has run on an image, so triage, which
runs again as each image of a study arrives, runs each model once per image.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone
from PIL import Image

from precedent.files import atomic_write
from studies.models import Cohort, Finding, Instance, Study

from . import localisation_metrics as metrics
from .models import Detection, ImageQuality, LocalisationRun, SegmentationMask, TriageModelVersion

log = logging.getLogger(__name__)

LESION = "lesion"
BREAST = "breast"
MAMMOGRAPHY = "mammography"  # the image-quality task of mammograms (quality.TASKS)
MASKS_DIR = Path("masks") / "triage"
# The detector's defaults for a trainer called by name (manage.py train_triage): 256-pixel
# crops of films scaled to a 512 long side, around lesions; keyword options override them.
DETECTOR_DEFAULTS = {"input_size": 512, "crop": 256, "batch_size": 8, "negatives_per_positive": 0.5}
DETECTOR_EPOCHS = 40
# Decoded films are shrunk to this multiple of the network's input before training,
# so a cohort of 4736×2624 DICOMs does not sit in memory at full size.
KEEP_FACTOR = 2


# --- reading a cohort ----------------------------------------------------------------------


@dataclass
class LabelledImage:
    instance: Instance
    pixels: np.ndarray
    monochrome1: bool
    scale: float  # stored pixels per image pixel (<= 1 after shrinking)
    boxes: list[tuple[float, float, float, float]]  # image pixels, clipped to the image
    circles: list[tuple[float, float, float, float]]  # the unclipped boxes (MIAS circles)
    labels: list[str]
    located: bool  # False: an abnormal finding without a box (where is unknown)
    task: str


def finding_boxes(instance_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    """Per instance: its boxed findings (ground truth from the dataset or a radiologist)
    and whether an abnormal finding lacks a box."""
    result: dict[int, dict[str, Any]] = {}
    for finding in Finding.objects.filter(instance_id__in=list(instance_ids)).order_by("pk"):
        entry = result.setdefault(finding.instance_id, {"boxes": [], "circles": [], "labels": [], "located": True})
        if finding.box is not None:
            entry["boxes"].append(tuple(finding.box))
            unclipped = (finding.attributes or {}).get("box_unclipped")
            entry["circles"].append(tuple(unclipped) if unclipped else tuple(finding.box))
            entry["labels"].append(finding.abnormality_class or finding.pathology)
        elif finding.pathology != Finding.Pathology.NORMAL:
            entry["located"] = False
    return result


def _shrink(pixels: np.ndarray, long_side: int) -> tuple[np.ndarray, float]:
    rows, cols = pixels.shape[:2]
    if max(rows, cols) <= long_side:
        return pixels, 1.0
    import torch
    import torch.nn.functional as F

    from .detection import to_grey

    scale = long_side / max(rows, cols)
    size = (max(1, round(rows * scale)), max(1, round(cols * scale)))
    t = torch.from_numpy(np.ascontiguousarray(to_grey(pixels)).copy())[None, None]
    return F.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)[0, 0].numpy(), scale


def picture(instance: Instance) -> tuple[np.ndarray, bool]:
    from embeddings.services import instance_picture

    decoded = instance_picture(instance)
    return decoded.pixels, decoded.monochrome1


# (detector version id, instance id) → its boxes: an instance's pixels and a version's
# weights never change, so evaluate_triage's exam scores and its FROC share one run.
_DETECTED: OrderedDict[tuple[int, int], list] = OrderedDict()
_DETECTED_MAX = 4096
_detected_lock = threading.Lock()


def detect_instance(loaded, instance: Instance, decoded: tuple[np.ndarray, bool] | None = None) -> list:
    """The detector's boxes (detection.Detection) on one image, decoding it unless the
    caller gives `decoded` (pixels, monochrome1) (raises as `picture` does); remembered
    for the process, so a second caller does not run the detector again."""
    from . import detection

    key = (loaded.version.pk, instance.pk)
    with _detected_lock:
        if key in _DETECTED:
            _DETECTED.move_to_end(key)
            return _DETECTED[key]
    pixels, monochrome1 = decoded if decoded is not None else picture(instance)
    boxes = detection.detect(loaded.module, loaded.meta, pixels, monochrome1=monochrome1)
    with _detected_lock:
        _DETECTED[key] = boxes
        while len(_DETECTED) > _DETECTED_MAX:
            _DETECTED.popitem(last=False)
    return boxes


def cohort_images(cohort: Cohort, *, keep_long_side: int, progress: bool = True, instances=None) -> list[LabelledImage]:
    """The cohort's images with pixel data, decoded and shrunk, with their finding boxes
    and their task from the quality check. Images not checked yet are checked first,
    as arrival would: a model records the tasks it was trained on and runs on those
    only, and an empty list would let it run on every kind of image. Images that
    cannot be decoded are skipped (logged)."""
    from tqdm import tqdm

    from .services import assess_cohort_images

    assess_cohort_images(cohort, progress=progress)
    if instances is None:
        instances = Instance.objects.filter(series__study__cohorts=cohort, has_pixel_data=True)
    instances = list(instances.select_related("series").order_by("pk"))
    boxes = finding_boxes(i.pk for i in instances)
    tasks = dict(ImageQuality.objects.filter(instance__in=instances).values_list("instance_id", "task"))
    images = []
    for instance in tqdm(instances, desc="decode", unit="image", disable=not progress):
        try:
            pixels, monochrome1 = picture(instance)
        except Exception as exc:  # a damaged file must not stop training on the rest
            log.warning("skipping %s: %s", instance.sop_instance_uid, exc)
            continue
        pixels, scale = _shrink(pixels, keep_long_side)
        entry = boxes.get(instance.pk, {"boxes": [], "circles": [], "labels": [], "located": True})
        images.append(
            LabelledImage(
                instance=instance,
                pixels=pixels,
                monochrome1=monochrome1,
                scale=scale,
                boxes=[tuple(v * scale for v in b) for b in entry["boxes"]],
                circles=[tuple(v * scale for v in b) for b in entry["circles"]],
                labels=list(entry["labels"]),
                located=entry["located"],
                task=tasks.get(instance.pk, ""),
            )
        )
    return images


def _training_record(cohort: Cohort, report: Any, images: Sequence[LabelledImage], device: str) -> dict[str, Any]:
    last = report.epoch_losses[-1] if report.epoch_losses else float("nan")
    return {
        "summary": (
            f"{len(report.epoch_losses)} epochs ({report.steps} steps) on {device} in {report.seconds:.0f} s,"
            f" {len(images)} images of cohort {cohort.name}, final loss {last:.3f}"
        ),
        "cohort": cohort.name,
        "epochs": report.settings.get("epochs"),
        "steps": report.steps,
        "device": device,
        "seconds": round(report.seconds, 1),
        "date": timezone.now().isoformat(),
        "epoch_losses": [round(v, 4) for v in report.epoch_losses],
        "tasks": sorted({i.task for i in images if i.task}),
        "settings": report.settings,
    }


# --- training --------------------------------------------------------------------------


def train_detector(
    *,
    cohort: Cohort,
    epochs: int | None = None,
    device: str | None = None,
    seed: int = 0,
    name: str = "",
    activate: bool = False,
    progress: bool = True,
    **options: Any,
) -> TriageModelVersion:
    """Train the lesion detector on the cohort's boxed findings (classes: the findings'
    abnormality classes) and register it. Images with an abnormal finding but no box
    are left out (the lesion is somewhere, so no place is background). `weights` or
    `init_from_encoder` start the trunk from a checkpoint, as for the classifier. Extra
    options go to `detection.train` (input_size, batch_size, lr, arch ...)."""
    from . import detection
    from .services import init_weights_path, triage_model_register

    options = {**DETECTOR_DEFAULTS, **options}
    options["init_weights"] = init_weights_path(
        weights=options.pop("weights", None), init_from_encoder=options.pop("init_from_encoder", False)
    )
    if options["init_weights"]:  # a bad file fails now, not after the cohort is decoded
        detection.check_init(options["init_weights"], arch=options.get("arch", detection.DEFAULT_ARCH))
    input_size = int(options["input_size"])
    images = [i for i in cohort_images(cohort, keep_long_side=KEEP_FACTOR * input_size, progress=progress) if i.located]
    options["breast_crop"] = _breast_crop(cohort, images, bool(options.get("breast_crop")))
    classes = sorted({label for i in images for label in i.labels})
    if not classes:
        raise ValueError(f"cohort {cohort.name!r} has no finding with a box to train a detector on")
    index = {label: n for n, label in enumerate(classes)}
    samples = [
        detection.Sample(i.pixels, list(i.boxes), [index[label] for label in i.labels], i.monochrome1) for i in images
    ]
    model, report = detection.train(
        samples,
        classes,
        epochs=epochs or DETECTOR_EPOCHS,
        device=device,
        seed=seed,
        progress=progress,
        **options,
    )
    meta = detection.make_meta(
        classes, detection.model_config(report), training=_training_record(cohort, report, images, report.device)
    )
    return triage_model_register(kind="detector", model=model, meta=meta, name=name, activate=activate)


def _breast_crop(cohort: Cohort, images: Sequence[LabelledImage], asked: bool) -> bool:
    """Whether the detector frames films by their breast (off unless asked for: on the
    MIAS split it changed neither FROC nor exam AUC beyond the spread between seeds,
    see the README). A chest film has no breast to crop to, so a cohort holding any
    is refused."""
    others = sorted({i.task for i in images} - {"", MAMMOGRAPHY})
    if asked and others:
        raise ValueError(
            f"breast cropping is for mammograms, and cohort {cohort.name!r} also holds {', '.join(others)} images"
        )
    return bool(asked)


def weak_masks(image: LabelledImage) -> dict[str, np.ndarray]:
    """The weak labels of one image: breast region (mammograms only) and lesions
    (when every abnormal finding has a box; an image with no finding at all, or only a
    normal one, has an empty lesion mask)."""
    from . import segmentation

    shape = image.pixels.shape[:2]
    masks: dict[str, np.ndarray] = {}
    if image.task in ("", MAMMOGRAPHY):
        masks[BREAST] = segmentation.breast_mask(image.pixels, monochrome1=image.monochrome1)
    if image.located:
        masks[LESION] = segmentation.ellipse_mask(shape, image.circles)
    return masks


def train_segmenter(
    *,
    cohort: Cohort,
    epochs: int | None = None,
    device: str | None = None,
    seed: int = 0,
    name: str = "",
    activate: bool = False,
    progress: bool = True,
    **options: Any,
) -> TriageModelVersion:
    """Train the breast-region and lesion U-Net on weak masks of the cohort's images
    (see `weak_masks`) and register it. Extra options go to `segmentation.train`."""
    from . import segmentation
    from .services import triage_model_register

    input_size = int(options.get("input_size", segmentation.DEFAULT_INPUT_SIZE))
    images = cohort_images(cohort, keep_long_side=KEEP_FACTOR * input_size, progress=progress)
    if not images:
        raise ValueError(f"cohort {cohort.name!r} has no image to train a segmenter on")
    samples = [segmentation.Sample(i.pixels, weak_masks(i), i.monochrome1) for i in images]
    labels = [label for label in segmentation.LABELS if any(label in s.masks for s in samples)]
    model, report = segmentation.train(
        samples,
        labels,
        epochs=epochs or segmentation.DEFAULT_EPOCHS,
        device=device,
        seed=seed,
        progress=progress,
        **options,
    )
    meta = segmentation.make_meta(
        labels, segmentation.model_config(report), training=_training_record(cohort, report, images, report.device)
    )
    return triage_model_register(kind="segmenter", model=model, meta=meta, name=name, activate=activate)


# --- running on arrival ------------------------------------------------------------------


def _active(kind: str):
    from .services import active_triage_model

    try:
        return active_triage_model(kind)
    except Exception:  # a missing or damaged weights file must not stop triage
        log.exception("the active %s cannot be loaded", kind)
        return None


def fits(loaded, task: str) -> bool:
    """A model runs on images of the tasks it was trained on (a mammography detector
    has nothing to say about a chest film); a model that does not say runs on all."""
    tasks = (loaded.meta.training or {}).get("tasks") or []
    return not tasks or task in tasks


def mask_file(version: TriageModelVersion, instance: Instance, label: str) -> Path:
    # A token in the name: two workers racing on one image never write the same file,
    # so the loser can remove its own files without touching the winner's.
    token = uuid.uuid4().hex[:12]
    return MASKS_DIR / version.name / instance.sop_instance_uid / f"{label}-{token}.png"


def write_png_atomic(path: Path, mask: np.ndarray) -> None:
    with atomic_write(path) as fh:
        Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(fh, format="PNG")


def _store_detections(instance: Instance, version: TriageModelVersion, boxes, seconds: float) -> bool:
    try:
        with transaction.atomic():
            LocalisationRun.objects.create(
                instance=instance, model_version=version, outputs=len(boxes), seconds=round(seconds, 3)
            )
            Detection.objects.bulk_create(
                Detection(
                    instance=instance,
                    model_version=version,
                    label=b.label,
                    score=b.score,
                    x0=b.x0,
                    y0=b.y0,
                    x1=b.x1,
                    y1=b.y1,
                )
                for b in boxes
            )
    except IntegrityError:  # another worker stored this (instance, version) first
        return False
    return True


def _store_masks(instance: Instance, version: TriageModelVersion, masks: dict[str, np.ndarray], seconds: float) -> bool:
    home = Path(settings.PRECEDENT_HOME)
    written: list[Path] = []
    try:
        rows = []
        for label, mask in masks.items():
            relative = mask_file(version, instance, label)
            write_png_atomic(home / relative, mask)
            written.append(home / relative)
            rows.append(
                SegmentationMask(
                    instance=instance,
                    model_version=version,
                    label=label,
                    mask_path=str(relative),
                    area_fraction=float(mask.mean()),
                )
            )
        with transaction.atomic():
            LocalisationRun.objects.create(
                instance=instance, model_version=version, outputs=len(rows), seconds=round(seconds, 3)
            )
            SegmentationMask.objects.bulk_create(rows)
    except IntegrityError:
        for path in written:
            path.unlink(missing_ok=True)
        return False
    except BaseException:
        for path in written:  # no file without its row
            path.unlink(missing_ok=True)
        raise
    return True


def localise_study(*, study: Study):
    """Run the active detector and segmenter on the study's assessable images that
    they have not seen yet, store their boxes and masks, and return the active
    detector's detections on the whole study (as `ModelDetection`s for `decide`)."""
    from .services import ModelDetection

    detector, segmenter = _active(TriageModelVersion.Kind.DETECTOR), _active(TriageModelVersion.Kind.SEGMENTER)
    if detector is None and segmenter is None:
        return []
    instances = (
        Instance.objects.filter(series__study=study, triage_quality__assessable=True)
        .select_related("triage_quality")
        .order_by("pk")
    )
    for instance in instances:
        todo = [
            loaded
            for loaded in (detector, segmenter)
            if loaded is not None
            and fits(loaded, instance.triage_quality.task)
            and not LocalisationRun.objects.filter(instance=instance, model_version=loaded.version).exists()
        ]
        if not todo:
            continue
        try:
            pixels, monochrome1 = picture(instance)
        except Exception as exc:
            log.warning("cannot localise %s: %s", instance.sop_instance_uid, exc)
            continue
        for loaded in todo:
            try:
                _run_one(loaded, instance, pixels, monochrome1)
            except Exception:  # one model failing on one image must not stop triage
                log.exception("%s failed on %s", loaded.version.name, instance.sop_instance_uid)
    if detector is None:
        return []
    rows = Detection.objects.filter(instance__series__study=study, model_version=detector.version).select_related(
        "instance"
    )
    return [ModelDetection(label=d.label, score=d.score, sop_instance_uid=d.instance.sop_instance_uid) for d in rows]


def _run_one(loaded, instance: Instance, pixels: np.ndarray, monochrome1: bool) -> None:
    started = time.perf_counter()
    if loaded.version.kind == TriageModelVersion.Kind.DETECTOR:
        from . import detection

        boxes = detection.detect(loaded.module, loaded.meta, pixels, monochrome1=monochrome1)
        _store_detections(instance, loaded.version, boxes, time.perf_counter() - started)
    else:
        from . import segmentation

        masks = segmentation.predict(loaded.module, loaded.meta, pixels, monochrome1=monochrome1)
        _store_masks(instance, loaded.version, masks, time.perf_counter() - started)


# --- evaluation ----------------------------------------------------------------------------


def evaluate_localisation(
    *, instances, out_dir: Path, progress: bool = False, models: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """FROC of the active detector and mean lesion Dice of the active segmenter on
    `instances`, against studies.Finding boxes (weak masks for Dice). Images with an
    abnormal finding but no box are left out (a mark there cannot be judged).
    A detection hits a lesion when IoU >= 0.1 or its centre lies inside the lesion's
    box. Writes froc.png (and localisation.json) into out_dir. `models` ("detector",
    "segmenter": loaded versions or None) evaluates those instead of the active ones."""
    from tqdm import tqdm

    from . import segmentation

    if models is None:
        models = {kind: _active(kind) for kind in (TriageModelVersion.Kind.DETECTOR, TriageModelVersion.Kind.SEGMENTER)}
    detector, segmenter = models.get("detector"), models.get("segmenter")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "froc": None,
        "dice_mean": None,
        "froc_png": "",
        "hit_rule": f"IoU >= {metrics.HIT_IOU} or detection centre inside the lesion box",
        "detector": detector.version.name if detector else None,
        "segmenter": segmenter.version.name if segmenter else None,
    }
    if detector is None and segmenter is None:
        result["reason"] = "no active detector or segmenter"
        return result
    instances = list(instances)
    boxes = finding_boxes(i.pk for i in instances)
    cases: list[metrics.ImageCase] = []
    dices: list[float] = []
    breast_dices: list[float] = []
    skipped = 0
    for instance in tqdm(instances, desc="evaluate localisation", unit="image", disable=not progress):
        entry = boxes.get(instance.pk, {"boxes": [], "circles": [], "labels": [], "located": True})
        if not entry["located"]:
            skipped += 1
            continue
        try:
            pixels, monochrome1 = picture(instance)
        except Exception as exc:
            log.warning("skipping %s: %s", instance.sop_instance_uid, exc)
            skipped += 1
            continue
        if detector is not None:
            found = detect_instance(detector, instance, (pixels, monochrome1))
            cases.append(
                metrics.ImageCase(
                    [(b.score, b.box) for b in found], [tuple(b) for b in entry["boxes"]], list(entry["labels"])
                )
            )
        if segmenter is not None:
            predicted = segmentation.predict(segmenter.module, segmenter.meta, pixels, monochrome1=monochrome1)
            if LESION in predicted and entry["boxes"]:
                weak = segmentation.ellipse_mask(predicted[LESION].shape, entry["circles"])
                dices.append(metrics.dice(predicted[LESION], weak))
            if BREAST in predicted:
                weak = segmentation.breast_mask(pixels, monochrome1=monochrome1)
                breast_dices.append(metrics.dice(predicted[BREAST], weak))
    result["images"] = len(instances) - skipped
    result["images_skipped"] = skipped
    if detector is not None:
        curve = metrics.froc(cases)
        result["lesions"] = curve.lesions
        # Every mark the detector made, all false where there is no lesion to find.
        result["false_marks_per_image"] = curve.false_marks_per_image[-1] if curve.false_marks_per_image else 0.0
        if curve.lesions:
            result["froc"] = {f"{rate:g}": metrics.sensitivity_at(curve, rate) for rate in metrics.FROC_RATES}
            # Which kinds of lesion it finds (MIAS: masses, calcifications, distortions ...).
            classes = metrics.froc_by_class(cases)
            result["froc_by_class"] = {
                label: {
                    "lesions": part.lesions,
                    **{f"{rate:g}": metrics.sensitivity_at(part, rate) for rate in metrics.FROC_RATES},
                }
                for label, part in classes.items()
            }
            png = out_dir / "froc.png"
            metrics.plot_froc(curve, png, title=f"FROC, {detector.version.name}", by_class=classes)
            result["froc_png"] = str(png)
        else:
            result["froc_note"] = (
                f"no lesion box to find in {curve.images} images; the detector made "
                f"{result['false_marks_per_image']:.2f} false marks per image"
            )
    if dices:
        result["dice_mean"] = float(np.mean(dices))
        result["dice_images"] = len(dices)
    if breast_dices:  # against the weak breast mask: how well the network learnt its teacher
        result["breast_dice_mean"] = float(np.mean(breast_dices))
    (out_dir / "localisation.json").write_text(json.dumps(result, indent=2))
    return result


# --- reading overlays (the viewer and the API) -----------------------------------------------


@dataclass(frozen=True)
class OverlayBox:
    label: str
    score: float | None
    x0: float
    y0: float
    x1: float
    y1: float
    source: str  # "model:<version name>" | "dataset" | "radiologist"
    abnormality_class: str = ""  # the model's class, or the finding's abnormality class
    pathology: str = ""  # a finding's pathology; "" for model boxes


@dataclass(frozen=True)
class Overlays:
    instance: Instance
    boxes: list[OverlayBox]
    masks: list[SegmentationMask]


def _shown_version(instance: Instance, kind: str) -> int | None:
    """Whose output to show on an image: the active model of the kind when it has run
    on the image, else the model of that kind that ran on it last (an image keeps its
    marks when a model is retired before the image is seen again)."""
    runs = LocalisationRun.objects.filter(instance=instance, model_version__kind=kind)
    active = runs.filter(model_version__status=TriageModelVersion.Status.ACTIVE).values_list(
        "model_version_id", flat=True
    )
    return active.first() or runs.order_by("-created_at", "-id").values_list("model_version_id", flat=True).first()


def instance_overlays(*, instance: Instance, min_score: float = 0.0) -> Overlays:
    """Ground-truth finding boxes, the shown detector's boxes (score >= min_score) and
    the shown segmenter's masks of one image."""
    boxes = [
        OverlayBox(
            label=" ".join(p for p in (f.pathology, f.abnormality_class) if p),
            score=None,
            x0=f.x0,
            y0=f.y0,
            x1=f.x1,
            y1=f.y1,
            source=f.source,
            abnormality_class=f.abnormality_class,
            pathology=f.pathology,
        )
        for f in Finding.objects.filter(instance=instance, x0__isnull=False).order_by("pk")
    ]
    detector = _shown_version(instance, TriageModelVersion.Kind.DETECTOR)
    if detector is not None:
        rows = Detection.objects.filter(instance=instance, model_version_id=detector, score__gte=min_score)
        boxes += [
            OverlayBox(d.label, d.score, d.x0, d.y0, d.x1, d.y1, f"model:{d.model_version.name}", d.label)
            for d in rows.select_related("model_version").order_by("-score", "id")
        ]
    segmenter = _shown_version(instance, TriageModelVersion.Kind.SEGMENTER)
    masks = []
    if segmenter is not None:
        masks = list(
            SegmentationMask.objects.filter(instance=instance, model_version_id=segmenter)
            .select_related("model_version")
            .order_by("label", "id")
        )
    return Overlays(instance=instance, boxes=boxes, masks=masks)
