"""Breast-region and lesion segmenter: a small U-Net trained on weak masks made from
the images themselves and from the finding boxes. No Django here.

Weak labels, because no MIAS film comes with a drawn outline:
- breast: Otsu threshold of the windowed film, the largest connected component
  (labels and markers are smaller, separate blobs), holes filled, edges smoothed;
- lesion: MIAS gives a centre and radius per lesion, stored as the circle's
  bounding square (unclipped where it leaves the film), so the inscribed ellipse of
  the box is the circle itself.

The network sees a square S×S resample of the image (aspect not kept: a mask is
resampled back the same way, so nothing shifts), one sigmoid output per label, and
learns with Dice + BCE (Dice keeps the small lesions from vanishing under the large
background; BCE keeps early training stable). `predict` returns one binary mask per
label at the image's full size.
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .detection import autocast, pick_device, to_grey, window
from .loop import fit
from .weights import ModelMeta

log = logging.getLogger(__name__)

LABELS = ("breast", "lesion")
DEFAULT_ARCH = "unet-small"
DEFAULT_INPUT_SIZE = 256
DEFAULT_WIDTHS = (16, 32, 64, 128)
DEFAULT_EPOCHS = 30
DEFAULT_BATCH_SIZE = 8
DEFAULT_LR = 2e-3
WEAK_MASK_SIZE = 256  # working resolution of the weak breast mask
# Measured against the expert tissue maps of the DDSM normals (bench/breast_mask_check.py,
# 47 films): Dice 0.943 at half of Otsu's cut, 0.972 at 0.3 (worst film 0.844 → 0.926);
# at 0.5 the fatty rim inside the skin line was lost. 0.2 and below start to leak.
BREAST_OTSU_FRACTION = 0.3
# breast_region: an opening of 6 working pixels (2.3 % of the film) cuts the film-edge
# strips of the Mini-DDSM scans off the breast; the margin keeps the skin line inside.
BREAST_REGION_OPEN_RADIUS = 6
BREAST_REGION_MARGIN = 0.03
BREAST_REGION_MIN_AREA = 0.02  # of the film: less is no breast (a blank or odd image)


Box = tuple[float, float, float, float]


# --- weak labels -----------------------------------------------------------------------


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of 0..1 values: the cut that maximises between-class variance."""
    hist, edges = np.histogram(values.ravel(), bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    weight0 = np.cumsum(hist)
    weight1 = weight0[-1] - weight0
    sum0 = np.cumsum(hist * centres)
    mean0 = sum0 / np.maximum(weight0, 1e-12)
    mean1 = (sum0[-1] - sum0) / np.maximum(weight1, 1e-12)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected component labels (0 = background) by breadth-first search; fine at
    the weak mask's working size (256²), no SciPy needed."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    rows, cols = mask.shape
    current = 0
    for start in zip(*np.nonzero(mask), strict=True):
        if labels[start]:
            continue
        current += 1
        labels[start] = current
        queue = deque([start])
        while queue:
            r, c = queue.popleft()
            for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= nr < rows and 0 <= nc < cols and mask[nr, nc] and not labels[nr, nc]:
                    labels[nr, nc] = current
                    queue.append((nr, nc))
    return labels, current


def largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = _components(mask)
    if count == 0:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Background not reachable from the border is a hole: fill it."""
    padded = np.pad(~mask, 1, constant_values=True)
    labels, _ = _components(padded)
    outside = labels == labels[0, 0]
    return ~outside[1:-1, 1:-1]


def _binary_open(mask: np.ndarray, radius: int) -> np.ndarray:
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    k = 2 * radius + 1
    eroded = -F.max_pool2d(-t, k, stride=1, padding=radius)
    opened = F.max_pool2d(eroded, k, stride=1, padding=radius)
    return opened[0, 0].numpy() > 0.5


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-free resize of a binary mask (bilinear, then 0.5): smooth edges, no blocks."""
    if mask.shape == shape:
        return mask.astype(bool)
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.interpolate(t, size=shape, mode="bilinear", align_corners=False)[0, 0].numpy() >= 0.5


def _tissue(grey: np.ndarray, *, monochrome1: bool, open_radius: int) -> np.ndarray:
    """The largest bright component at the 256-pixel working size, after an opening of
    `open_radius` working pixels (cuts bridges to labels and film edges thinner than
    twice that)."""
    small = _resample(grey, (WEAK_MASK_SIZE, WEAK_MASK_SIZE))
    low, high = window(grey)
    unit = np.clip((small - low) / max(high - low, 1e-6), 0, 1)
    if monochrome1:
        unit = 1.0 - unit
    # A fraction of Otsu's cut: Otsu alone splits dense tissue from fat and drops the
    # fatty edge of the breast; the film background sits far below either.
    mask = unit > BREAST_OTSU_FRACTION * otsu_threshold(unit)
    return largest_component(_binary_open(mask, open_radius))


def breast_mask(pixels: np.ndarray, *, monochrome1: bool = False) -> np.ndarray:
    """Weak breast-region mask at the image's size: Otsu on the windowed image at a
    256-pixel working size, opened (cuts thin bridges to labels), largest component,
    holes filled."""
    grey = to_grey(pixels)
    mask = fill_holes(_tissue(grey, monochrome1=monochrome1, open_radius=2))
    return resize_mask(mask, grey.shape)


def breast_region(pixels: np.ndarray, *, monochrome1: bool = False) -> tuple[int, int, int, int]:
    """The breast's bounding box (x0, y0, x1, y1; image pixels, x1/y1 exclusive) with a
    margin, for cropping a film to its breast: the background, the labels and the
    film's edges are left out. The whole image when no breast-sized region is found.

    The mask for the box is opened harder than `breast_mask` (BREAST_REGION_OPEN_RADIUS):
    a digitised film's bright unexposed edge often touches the breast, and the gentle
    opening keeps it, which would make every Mini-DDSM box the whole film."""
    grey = to_grey(pixels)
    rows, cols = grey.shape
    mask = _tissue(grey, monochrome1=monochrome1, open_radius=BREAST_REGION_OPEN_RADIUS)
    if mask.mean() < BREAST_REGION_MIN_AREA:
        return 0, 0, cols, rows
    ys, xs = np.nonzero(mask)
    fy, fx = rows / WEAK_MASK_SIZE, cols / WEAK_MASK_SIZE
    margin_y, margin_x = BREAST_REGION_MARGIN * rows, BREAST_REGION_MARGIN * cols
    x0 = max(0, math.floor(xs.min() * fx - margin_x))
    y0 = max(0, math.floor(ys.min() * fy - margin_y))
    x1 = min(cols, math.ceil((xs.max() + 1) * fx + margin_x))
    y1 = min(rows, math.ceil((ys.max() + 1) * fy + margin_y))
    return x0, y0, x1, y1


def ellipse_mask(shape: tuple[int, int], boxes: Sequence[Box]) -> np.ndarray:
    """The ellipses inscribed in the boxes (image pixels, x1/y1 exclusive), united.
    A box may reach past the image (an unclipped MIAS circle): the part inside counts."""
    rows, cols = shape
    mask = np.zeros(shape, dtype=bool)
    yy = np.arange(rows, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(cols, dtype=np.float32)[None, :] + 0.5
    for x0, y0, x1, y1 in boxes:
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        if rx <= 0 or ry <= 0:
            continue
        r0, r1 = max(0, int(math.floor(y0))), min(rows, int(math.ceil(y1)))
        c0, c1 = max(0, int(math.floor(x0))), min(cols, int(math.ceil(x1)))
        if r0 >= r1 or c0 >= c1:
            continue
        inside = ((xx[:, c0:c1] - cx) / rx) ** 2 + ((yy[r0:r1] - cy) / ry) ** 2 <= 1.0
        mask[r0:r1, c0:c1] |= inside
    return mask


# --- the model -------------------------------------------------------------------------


class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """A small U-Net: one grey channel in, one logit map per label out, same size."""

    def __init__(self, n_labels: int, widths: Sequence[int] = DEFAULT_WIDTHS) -> None:
        super().__init__()
        widths = list(widths)
        self.down = nn.ModuleList()
        cin = 1
        for w in widths:
            self.down.append(_Block(cin, w))
            cin = w
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(cin, w, 2, stride=2))
            self.merge.append(_Block(2 * w, w))
            cin = w
        self.out = nn.Conv2d(cin, n_labels, 1)
        self.depth = len(widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < self.depth - 1:
                skips.append(x)
                x = F.max_pool2d(x, 2)
        for up, merge in zip(self.up, self.merge, strict=True):
            x = up(x)
            x = merge(torch.cat([x, skips.pop()], dim=1))
        return self.out(x)


def build(labels: Sequence[str] = LABELS, *, widths: Sequence[int] = DEFAULT_WIDTHS, **_: Any) -> UNet:
    if not labels:
        raise ValueError("a segmenter needs at least one label")
    return UNet(len(labels), widths)


def make_meta(labels: Sequence[str], config: dict[str, Any], **extra: Any) -> ModelMeta:
    return ModelMeta(
        kind="segmenter",
        architecture=DEFAULT_ARCH,
        classes=tuple(labels),
        config=config,
        preprocessing={"input_size": config.get("input_size", DEFAULT_INPUT_SIZE), "channels": 1, "resample": "square"},
        **extra,
    )


def build_from_meta(meta: ModelMeta) -> nn.Module:
    if meta.kind != "segmenter":
        raise ValueError(f"not a segmenter: {meta.kind}")
    return build(meta.classes, widths=tuple(meta.config.get("widths", DEFAULT_WIDTHS)))


# --- preprocessing and inference -------------------------------------------------------


def _resample(grey: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(grey, dtype=np.float32).copy())[None, None]
    return F.interpolate(t, size=shape, mode="bilinear", antialias=True, align_corners=False)[0, 0].numpy()


def prepare(pixels: np.ndarray, size: int, *, monochrome1: bool = False) -> torch.Tensor:
    """Windowed 0..1 grey, resampled to size×size, normalised: 1×S×S."""
    grey = to_grey(pixels)
    low, high = window(grey)
    small = _resample(grey, (size, size))
    unit = np.clip((small - low) / max(high - low, 1e-6), 0, 1)
    if monochrome1:
        unit = 1.0 - unit
    return (torch.from_numpy(unit.astype(np.float32))[None] - 0.5) / 0.25


@torch.no_grad()
def predict(
    model: UNet,
    meta: ModelMeta,
    pixels: np.ndarray,
    *,
    monochrome1: bool = False,
    threshold: float = 0.5,
    device: torch.device | None = None,
) -> dict[str, np.ndarray]:
    """{label: boolean mask with the image's rows × columns}."""
    device = device or next(model.parameters()).device
    size = int(meta.preprocessing.get("input_size", DEFAULT_INPUT_SIZE))
    rows, cols = to_grey(pixels).shape
    x = prepare(pixels, size, monochrome1=monochrome1)[None].to(device)
    was_training = model.training
    model.eval()
    with autocast(device):
        logits = model(x)
    model.train(was_training)
    probs = torch.sigmoid(logits.float()).cpu()
    full = F.interpolate(probs, size=(rows, cols), mode="bilinear", align_corners=False)[0]
    return {label: (full[i] >= threshold).numpy() for i, label in enumerate(meta.classes)}


# --- training --------------------------------------------------------------------------


@dataclass
class Sample:
    """One training image and its weak masks ({label: bool mask at the image's size};
    a label left out is unknown for this image and does not count in the loss)."""

    pixels: np.ndarray
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    monochrome1: bool = False


@dataclass
class TrainReport:
    epoch_losses: list[float]
    seconds: float
    steps: int
    device: str
    settings: dict[str, Any]


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Soft Dice + BCE over the known (image, label) pairs; `known` is N×L of 0/1.

    Dice is taken per label over the whole batch, not per image: most films have no
    lesion, and a per-image Dice rewards an empty prediction on each of them so much
    that the network learns never to mark a lesion. Over the batch, lesion-free films
    only add their false positives to the denominator."""
    weight = known[:, :, None, None].expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum")
    bce = bce / weight.sum().clamp(min=1)
    probs = torch.sigmoid(logits) * weight
    inter = (probs * target).sum(dim=(0, 2, 3))
    total = probs.sum(dim=(0, 2, 3)) + (target * weight).sum(dim=(0, 2, 3))
    dice = 1 - (2 * inter + 1.0) / (total + 1.0)
    labelled = (known.sum(dim=0) > 0).float()
    dice = (dice * labelled).sum() / labelled.sum().clamp(min=1)
    return dice + bce


def train(
    samples: Sequence[Sample],
    labels: Sequence[str] = LABELS,
    *,
    input_size: int = DEFAULT_INPUT_SIZE,
    widths: Sequence[int] = DEFAULT_WIDTHS,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    max_steps: int | None = None,
    max_seconds: float | None = None,
    crop: int | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[UNet, TrainReport]:
    """Train the U-Net on images and weak masks; horizontal flips and gamma jitter.
    `crop` trains on crop×crop windows of the input_size images, half of them centred
    near a lesion on images that have one (lesions are a small share of a film's
    pixels; whole films teach mostly "breast" and "background"); the U-Net is fully
    convolutional, so `predict` still runs on the whole input_size image.
    `max_seconds` caps the wall time, the cosine schedule following whichever of steps
    or seconds is further along (see loop.fit). Returns the model (CPU, eval
    mode) and a report."""
    if not samples:
        raise ValueError("no training images")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    device = pick_device(str(device) if device is not None else None)
    images = torch.stack([prepare(s.pixels, input_size, monochrome1=s.monochrome1) for s in samples])
    targets = torch.zeros(len(samples), len(labels), input_size, input_size)
    known = torch.zeros(len(samples), len(labels))
    for i, sample in enumerate(samples):
        for j, label in enumerate(labels):
            if label in sample.masks:
                small = resize_mask(sample.masks[label], (input_size, input_size))
                targets[i, j] = torch.from_numpy(small.astype(np.float32))
                known[i, j] = 1.0
    model = build(labels, widths=widths).to(device).train()
    lesion_channel = list(labels).index("lesion") if "lesion" in labels else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)

    def epoch_batches():
        order = list(range(len(samples)))
        rng.shuffle(order)
        return (order[start : start + batch_size] for start in range(0, len(order), batch_size))

    def batch_loss(batch: list[int]) -> torch.Tensor:
        index = torch.tensor(batch)
        x, y, k = images[index].clone(), targets[index].clone(), known[index]
        if crop and crop < input_size:
            x, y = _crops(x, y, lesion_channel, crop, rng)
        if rng.random() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        gamma = math.exp(rng.uniform(-0.25, 0.25))
        x = ((x * 0.25 + 0.5).clamp(0, 1).pow(gamma) - 0.5) / 0.25
        x, y, k = x.to(device), y.to(device), k.to(device)
        with autocast(device):
            logits = model(x)
        return dice_bce_loss(logits.float(), y, k)

    run = fit(
        batch_loss,
        optimizer=optimizer,
        epoch_batches=epoch_batches,
        epochs=epochs,
        steps_per_epoch=math.ceil(len(samples) / batch_size),
        max_steps=max_steps,
        max_seconds=max_seconds,
        name="unet",
        progress=progress,
    )
    settings = {
        "input_size": input_size,
        "widths": list(widths),
        "epochs": epochs,
        "epochs_run": len(run.losses),
        "crop": crop,
        "max_seconds": max_seconds,
        "stopped_by_clock": run.stopped_by_clock,
        "batch_size": batch_size,
        "lr": lr,
        "images": len(samples),
        "labelled": {label: int(known[:, j].sum()) for j, label in enumerate(labels)},
        "seed": seed,
    }
    return model.cpu().eval(), TrainReport(run.losses, run.seconds, run.steps, str(device), settings)


def _crops(
    x: torch.Tensor, y: torch.Tensor, lesion_channel: int | None, size: int, rng: random.Random
) -> tuple[torch.Tensor, torch.Tensor]:
    """One size×size window per image of the batch: near a lesion pixel half of the
    time when the image has one, anywhere otherwise."""
    _, _, h, w = x.shape
    xs, ys = [], []
    for i in range(x.shape[0]):
        top, left = rng.randint(0, h - size), rng.randint(0, w - size)
        if lesion_channel is not None and rng.random() < 0.5:
            points = torch.nonzero(y[i, lesion_channel] > 0.5)
            if len(points):
                r, c = points[rng.randrange(len(points))].tolist()
                top = min(max(0, r - rng.randint(size // 8, size - size // 8)), h - size)
                left = min(max(0, c - rng.randint(size // 8, size - size // 8)), w - size)
        xs.append(x[i, :, top : top + size, left : left + size])
        ys.append(y[i, :, top : top + size, left : left + size])
    return torch.stack(xs), torch.stack(ys)


def model_config(report: TrainReport) -> dict[str, Any]:
    return {"input_size": report.settings["input_size"], "widths": report.settings["widths"]}
