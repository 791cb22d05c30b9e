"""Lesion detector: FCOS (torchvision's anchor-free detector) on a small ResNet-18
FPN, trained from scratch on the platform's own finding boxes. No Django here.

Why FCOS on ResNet-18: the MIAS lesions run from a few pixels (calcification
clusters) to a third of the film; an FPN covers that range, FCOS has no anchor
shapes to tune for it, and ResNet-18 with a 128-channel FPN and a two-conv head
trains on two CPU cores at a 512-pixel long side (the default input here). A GPU
would allow the full 1024 px of a MIAS film (calcifications keep their size), a
ResNet-50 FPN and many more epochs with heavier augmentation.

Coordinates: boxes in and out are in pixels of the image passed in (top-left
origin, x1/y1 exclusive), whatever the network's input size; `Detector.detect`
does the scaling both ways.

Grey input is handled at the source: the first convolution takes one channel and
the transform normalises one channel, instead of copying the film into three
identical channels (three times the first layer's work for nothing).
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18, resnet34
from torchvision.models.detection import FCOS
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import nms
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from embeddings.encoder import pick_device

from .loop import fit
from .weights import InitReport, ModelMeta, init_trunk

log = logging.getLogger(__name__)

ARCHITECTURES = {"fcos-resnet18": resnet18, "fcos-resnet34": resnet34}
DEFAULT_ARCH = "fcos-resnet18"
DEFAULT_INPUT_SIZE = 512  # long side, pixels; 2 CPU cores. A GPU takes 1024 (MIAS full size).
DEFAULT_FPN_CHANNELS = 128
DEFAULT_HEAD_CONVS = 2
DEFAULT_EPOCHS = 12
DEFAULT_LR = 1e-3
DEFAULT_BATCH_SIZE = 4
WINDOW_PERCENTILES = (0.5, 99.5)
MEAN, STD = 0.5, 0.25  # of the windowed 0..1 grey values


Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Box2D:
    """One detection in image pixels."""

    label: str
    score: float
    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def box(self) -> Box:
        return (self.x0, self.y0, self.x1, self.y1)


@dataclass
class Sample:
    """One training image: decoded pixels (any size, modality values or 8-bit grey) and
    its boxes (image pixels) with class indices."""

    pixels: np.ndarray
    boxes: list[Box] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    monochrome1: bool = False


# --- preprocessing ---------------------------------------------------------------------


def window(grey: np.ndarray, percentiles: tuple[float, float] = WINDOW_PERCENTILES) -> tuple[float, float]:
    """(low, high) from a strided sample (cheap on a 4736×2624 film, as the encoder does)."""
    sample = grey[:: max(1, grey.shape[0] // 512), :: max(1, grey.shape[1] // 512)]
    low, high = (float(v) for v in np.percentile(sample, percentiles))
    if high <= low:
        low, high = float(grey.min()), float(grey.max())
    return low, high


def to_grey(pixels: np.ndarray) -> np.ndarray:
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        return pixels[..., :3].astype(np.float32).mean(axis=-1)
    if pixels.ndim != 2:
        raise ValueError(f"expected a grey H×W or colour H×W×3 image, got shape {pixels.shape}")
    return pixels.astype(np.float32, copy=False)


@dataclass(frozen=True)
class Framing:
    """Where the network's input lies in the image: the region cut out (image pixels,
    top-left corner x0, y0; the whole image unless cropped to the breast) and the
    scale region → input. Boxes go both ways with it."""

    scale: float
    x0: int = 0
    y0: int = 0

    def to_input(self, boxes: torch.Tensor) -> torch.Tensor:
        offset = torch.tensor([self.x0, self.y0, self.x0, self.y0], dtype=boxes.dtype)
        return (boxes - offset) * self.scale

    def to_image(self, boxes: torch.Tensor) -> torch.Tensor:
        offset = torch.tensor([self.x0, self.y0, self.x0, self.y0], dtype=boxes.dtype)
        return boxes / self.scale + offset


def prepare(
    pixels: np.ndarray, long_side: int, *, monochrome1: bool = False, breast_crop: bool = False
) -> tuple[torch.Tensor, Framing]:
    """Windowed 0..1 grey image 1×h×w with its long side `long_side` (aspect kept, no
    padding: the detector takes any size), and where it lies in the image.

    `breast_crop` first cuts the film down to its breast (`segmentation.breast_region`)
    and windows that: no background, label or film edge for the detector to mark, and
    the same framing whatever the source left around the breast."""
    grey = to_grey(pixels)
    x0 = y0 = 0
    if breast_crop:
        from .segmentation import breast_region  # segmentation builds on this module

        x0, y0, x1, y1 = breast_region(grey, monochrome1=monochrome1)
        grey = grey[y0:y1, x0:x1]
    low, high = window(grey)
    rows, cols = grey.shape
    scale = long_side / max(rows, cols)
    size = (max(1, round(rows * scale)), max(1, round(cols * scale)))
    tensor = torch.from_numpy(np.ascontiguousarray(grey).copy())[None, None]
    if size != (rows, cols):
        tensor = F.interpolate(tensor, size=size, mode="bilinear", antialias=True, align_corners=False)
    tensor = ((tensor - low) / max(high - low, 1e-6)).clamp_(0.0, 1.0)
    if monochrome1:
        tensor = 1.0 - tensor
    return tensor[0], Framing(scale, x0, y0)


# --- the model -------------------------------------------------------------------------


def check_init(path: str | os.PathLike[str], *, arch: str = DEFAULT_ARCH) -> InitReport:
    """Load a trunk checkpoint into a throwaway detector of `arch`: raises ModelFileError
    for a damaged file or another architecture before any film is decoded."""
    return init_trunk(build(["lesion"], arch=arch).backbone.body, path, architecture=arch)


def build(
    classes: Sequence[str],
    *,
    arch: str = DEFAULT_ARCH,
    input_size: int = DEFAULT_INPUT_SIZE,
    fpn_channels: int = DEFAULT_FPN_CHANNELS,
    head_convs: int = DEFAULT_HEAD_CONVS,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.3,
    detections_per_img: int = 20,
) -> FCOS:
    """A randomly initialised one-channel FCOS (weights=None everywhere: nothing is
    downloaded)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown detector architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    if not classes:
        raise ValueError("a detector needs at least one class")
    if fpn_channels < 64 or fpn_channels % 32:
        # The head's GroupNorm has 32 groups: one channel per group leaves nothing to
        # normalise on the 1×1 top level of a small image.
        raise ValueError(f"fpn_channels must be a multiple of 32 and at least 64, got {fpn_channels}")
    body = ARCHITECTURES[arch](weights=None)
    body.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    backbone = BackboneWithFPN(
        body,
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=[128, 256, 512],
        out_channels=fpn_channels,
        extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels),
    )
    head = FCOSHead(fpn_channels, 1, len(classes), num_convs=head_convs)
    model = FCOS(
        backbone,
        num_classes=len(classes),
        min_size=input_size,
        max_size=input_size,
        image_mean=[MEAN],
        image_std=[STD],
        head=head,
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
    )
    # Images arrive at input size already (`prepare`): the transform only normalises and
    # batches, so training's scale jitter is not undone by a resize back to input_size.
    model.transform = _NormaliseOnly(input_size, input_size, [MEAN], [STD])
    return model


class _NormaliseOnly(GeneralizedRCNNTransform):
    def resize(self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None):
        return image, target


def make_meta(classes: Sequence[str], config: dict[str, Any], **extra: Any) -> ModelMeta:
    return ModelMeta(
        kind="detector",
        architecture=config.get("arch", DEFAULT_ARCH),
        classes=tuple(classes),
        config=config,
        preprocessing={
            "long_side": config.get("input_size", DEFAULT_INPUT_SIZE),
            "breast_crop": bool(config.get("breast_crop", False)),
            "window_percentiles": list(WINDOW_PERCENTILES),
            "mean": MEAN,
            "std": STD,
            "channels": 1,
        },
        **extra,
    )


def build_from_meta(meta: ModelMeta) -> nn.Module:
    if meta.kind != "detector":
        raise ValueError(f"not a detector: {meta.kind}")
    config = dict(meta.config)
    return build(meta.classes, **{k: v for k, v in config.items() if k in _BUILD_KEYS})


_BUILD_KEYS = {"arch", "input_size", "fpn_channels", "head_convs", "score_thresh", "nms_thresh", "detections_per_img"}


# --- inference -------------------------------------------------------------------------


def autocast(device: torch.device):
    # bf16 on CUDA; on these CPUs bf16 is emulated and slower, so fp32 there.
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def detect(
    model: FCOS,
    meta: ModelMeta,
    pixels: np.ndarray,
    *,
    monochrome1: bool = False,
    min_score: float = 0.0,
    device: torch.device | None = None,
) -> list[Box2D]:
    """Boxes (image pixels of `pixels`, clipped to it) with class and score, after the
    model's per-class NMS and a class-agnostic NMS (one lesion, one mark: two classes
    on the same spot would count as a false mark), best first."""
    device = device or next(model.parameters()).device
    long_side = int(meta.preprocessing.get("long_side", DEFAULT_INPUT_SIZE))
    breast_crop = bool(meta.preprocessing.get("breast_crop", False))  # older models: the whole film
    tensor, framing = prepare(pixels, long_side, monochrome1=monochrome1, breast_crop=breast_crop)
    was_training = model.training
    model.eval()
    # fp32 even on CUDA: the boxes are decoded inside the model, and in bf16 a
    # coordinate near 512 is rounded to a multiple of 4 pixels.
    out = model([tensor.to(device)])[0]
    model.train(was_training)
    boxes = framing.to_image(out["boxes"].float().cpu())
    scores, labels = out["scores"].float().cpu(), out["labels"].cpu()
    if len(boxes):
        keep = nms(boxes, scores, float(meta.config.get("nms_thresh", 0.3)))
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    rows, cols = to_grey(pixels).shape if pixels.ndim == 3 else pixels.shape
    result = []
    for box, score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist(), strict=True):
        if score < min_score:
            continue
        x0, y0 = max(0.0, box[0]), max(0.0, box[1])
        x1, y1 = min(float(cols), box[2]), min(float(rows), box[3])
        if x1 > x0 and y1 > y0:
            result.append(Box2D(meta.classes[label], float(score), x0, y0, x1, y1))
    return result


# --- training --------------------------------------------------------------------------


@dataclass
class TrainReport:
    epoch_losses: list[float]
    seconds: float
    steps: int
    device: str
    settings: dict[str, Any]


def _augment(tensor: torch.Tensor, boxes: torch.Tensor, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal flip (left and right breasts), a small scale change, gamma and
    contrast jitter; boxes follow the geometry."""
    _, h, w = tensor.shape
    if rng.random() < 0.5:
        tensor = tensor.flip(-1)
        if len(boxes):
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
    factor = rng.uniform(0.85, 1.15)
    size = (max(32, round(h * factor)), max(32, round(w * factor)))
    tensor = F.interpolate(tensor[None], size=size, mode="bilinear", align_corners=False)[0]
    if len(boxes):
        boxes = boxes * torch.tensor([size[1] / w, size[0] / h, size[1] / w, size[0] / h])
    gamma = math.exp(rng.uniform(-0.25, 0.25))
    tensor = tensor.clamp(0, 1).pow(gamma)
    tensor = ((tensor - 0.5) * rng.uniform(0.9, 1.1) + 0.5).clamp(0, 1)
    return tensor, boxes


def _crop(
    tensor: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, size: int, rng: random.Random
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A size×size window: around a random lesion when there is one (its centre
    anywhere inside the window), anywhere otherwise. Boxes are clipped to the window;
    one left with under a quarter of its area is dropped (a sliver of a lesion at the
    edge teaches nothing either way)."""
    _, h, w = tensor.shape
    if h <= size and w <= size:
        return tensor, boxes, labels
    ch, cw = min(size, h), min(size, w)
    if len(boxes):
        x0, y0, x1, y1 = boxes[rng.randrange(len(boxes))].tolist()
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        left = int(min(max(0, cx - rng.uniform(0.15, 0.85) * cw), w - cw))
        top = int(min(max(0, cy - rng.uniform(0.15, 0.85) * ch), h - ch))
    else:
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    tensor = tensor[:, top : top + ch, left : left + cw]
    shifted = boxes - torch.tensor([left, top, left, top], dtype=boxes.dtype)
    return (tensor, *_clip_boxes(shifted, labels, cw, ch))


def _clip_boxes(
    boxes: torch.Tensor, labels: torch.Tensor, width: int, height: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes clipped to a width×height window; one left with under a quarter of its
    area is dropped with its label."""
    if not len(boxes):
        return boxes, labels
    clipped = torch.stack(
        [
            boxes[:, 0].clamp(0, width),
            boxes[:, 1].clamp(0, height),
            boxes[:, 2].clamp(0, width),
            boxes[:, 3].clamp(0, height),
        ],
        dim=1,
    )
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    kept = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1]) >= 0.25 * area
    return clipped[kept], labels[kept]


def _prepared(
    samples: Sequence[Sample], long_side: int, *, breast_crop: bool = False
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each sample's input tensor with its boxes in input pixels. With `breast_crop`,
    a box is clipped to the breast's region and dropped when under a quarter of it
    lies inside (logged: it says the region missed a lesion)."""
    prepared = []
    dropped = 0
    for sample in samples:
        tensor, framing = prepare(sample.pixels, long_side, monochrome1=sample.monochrome1, breast_crop=breast_crop)
        boxes = framing.to_input(torch.tensor(sample.boxes, dtype=torch.float32).reshape(-1, 4))
        labels = torch.tensor(sample.labels, dtype=torch.int64)
        if breast_crop:
            before = len(boxes)
            boxes, labels = _clip_boxes(boxes, labels, tensor.shape[-1], tensor.shape[-2])
            dropped += before - len(boxes)
        prepared.append((tensor, boxes, labels))
    if dropped:
        log.warning("%d box(es) lie outside their film's breast region and were left out", dropped)
    return prepared


def train(
    samples: Sequence[Sample],
    classes: Sequence[str],
    *,
    arch: str = DEFAULT_ARCH,
    input_size: int = DEFAULT_INPUT_SIZE,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    negatives_per_positive: float = 0.5,
    fpn_channels: int = DEFAULT_FPN_CHANNELS,
    head_convs: int = DEFAULT_HEAD_CONVS,
    max_steps: int | None = None,
    max_seconds: float | None = None,
    crop: int | None = None,
    breast_crop: bool = False,
    augment: bool = True,
    init_weights: str | os.PathLike[str] | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[FCOS, TrainReport]:
    """Train on images with boxes (and some without: FCOS learns background from them).

    Each epoch takes every image with a box plus `negatives_per_positive` times as many
    images without one, drawn afresh, so normal films teach "no lesion here" without
    swamping the few lesions. AdamW with cosine decay; bf16 autocast on CUDA.
    `crop` trains on crop×crop windows of the input-size image, around a lesion on
    images that have one: a quarter of the pixels of a 512 film for a 256 crop, so
    four times the steps in the same time, at full resolution (the network is fully
    convolutional, so detection still runs on the whole image).
    `breast_crop` frames every film by its breast region (see `prepare`), in training
    and, through the saved preprocessing, in `detect`: mammograms only.
    `max_seconds` caps the wall time (on shared CPUs the step time is unknowable in
    advance): the learning-rate schedule then follows whichever of steps or seconds is
    further along, so a run stopped by the clock still ends at a small learning rate.
    `init_weights` starts the ResNet trunk under the FPN from a checkpoint (a search
    encoder, a triage classifier or detector, or torchvision weights a site provides;
    `weights.init_trunk`); the FPN and heads start at random.
    Returns the model (CPU, eval mode) and a report."""
    if not samples:
        raise ValueError("no training images")
    positives = [i for i, s in enumerate(samples) if s.boxes]
    if not positives:
        raise ValueError("no training image has a box")
    for sample in samples:
        if len(sample.boxes) != len(sample.labels) or any(not 0 <= c < len(classes) for c in sample.labels):
            raise ValueError("each box needs a class index within classes")
    negatives = [i for i, s in enumerate(samples) if not s.boxes]
    torch.manual_seed(seed)
    rng = random.Random(seed)
    device = pick_device(str(device) if device is not None else None)
    config = {
        "arch": arch,
        "input_size": input_size,
        "fpn_channels": fpn_channels,
        "head_convs": head_convs,
        "score_thresh": 0.05,
        "nms_thresh": 0.3,
        "detections_per_img": 20,
    }
    model = build(classes, **config)
    init = init_trunk(model.backbone.body, init_weights, architecture=arch) if init_weights else None
    model = model.to(device).train()
    data = _prepared(samples, input_size, breast_crop=breast_crop)
    n_neg = min(len(negatives), round(negatives_per_positive * len(positives)))
    steps_per_epoch = math.ceil((len(positives) + n_neg) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)

    def epoch_batches():
        order = positives + rng.sample(negatives, n_neg)  # fresh negatives every epoch
        rng.shuffle(order)
        return (order[start : start + batch_size] for start in range(0, len(order), batch_size))

    def batch_loss(batch: list[int]) -> torch.Tensor:
        images, targets = [], []
        for index in batch:
            tensor, boxes, labels = data[index]
            if augment:
                tensor, boxes = _augment(tensor, boxes, rng)
            if crop:
                tensor, boxes, labels = _crop(tensor, boxes, labels, crop, rng)
            images.append(tensor.to(device))
            targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
        with autocast(device):
            return sum(model(images, targets).values())

    run = fit(
        batch_loss,
        optimizer=optimizer,
        epoch_batches=epoch_batches,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        max_steps=max_steps,
        max_seconds=max_seconds,
        warmup=True,
        clip_grad_norm=10.0,
        name=arch,
        progress=progress,
    )
    settings = {
        **config,
        "epochs": epochs,
        "epochs_run": len(run.losses),
        "crop": crop,
        "breast_crop": breast_crop,
        "max_seconds": max_seconds,
        "stopped_by_clock": run.stopped_by_clock,
        "batch_size": batch_size,
        "lr": lr,
        "negatives_per_positive": negatives_per_positive,
        "images": len(samples),
        "positive_images": len(positives),
        "boxes": sum(len(s.boxes) for s in samples),
        "seed": seed,
        "init": asdict(init) if init else None,
    }
    return model.cpu().eval(), TrainReport(run.losses, run.seconds, run.steps, str(device), settings)


def model_config(report: TrainReport) -> dict[str, Any]:
    """The build arguments of a trained model and its framing, for its ModelMeta."""
    return {k: report.settings[k] for k in (*_BUILD_KEYS, "breast_crop")}
