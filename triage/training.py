"""Training the mammogram classifier (pure torch; no Django).

The caller decodes the films and passes arrays with their labels; each film is
windowed, resized and oriented once (`classifier.prepare_film`) and kept in memory.

Patch training, whole-image inference. With a few hundred films a whole-image
classifier at ≥ 512 px learns mostly where the film label and the pectoral muscle
are; a lesion is a few dozen pixels of it. So each step shows a `patch_size` crop:
centred (with jitter) on a lesion box for an abnormal film, anywhere in the breast for
a normal one, with the film's label. The classifier is fully convolutional with
log-sum-exp pooling, so the same weights then score the whole film, where the pooling
lets the most suspicious region speak for the image. `patch_size=0` trains on whole
films instead.

Class imbalance: the loss weights positives by negatives/positives (per head), so a
cohort with three normals for one abnormal does not learn "always normal".

Augmentations that exist in mammography: small rotations and scale changes
(positioning, compression, breast size), vertical flips (an MLO flipped top-down is
still a plausible breast; left-right is fixed by the orientation step), gamma and
contrast changes (film, exposure and processing differ between sites). No colour, no
cut-outs (which can delete the only lesion).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from embeddings.encoder import pick_device

from .classifier import (
    ClassifierPreprocessing,
    InitReport,
    MammoClassifier,
    box_to_input,
    build_classifier,
    init_backbone,
    normalise,
    prepare_film,
)
from .loop import fit

log = logging.getLogger(__name__)

UNKNOWN = -1  # a malignancy label we do not have (normal films, or pathology unknown)
BREAST_LEVEL = 0.08  # windowed grey above which a pixel is breast, not background


@dataclass
class TrainingItem:
    """One labelled film: pixels as decoded, labels, lesion boxes in image pixels."""

    pixels: np.ndarray
    abnormal: int  # 0 or 1
    malignant: int = UNKNOWN  # 0, 1 or UNKNOWN
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    monochrome1: bool = False
    key: str = ""


@dataclass(frozen=True)
class ClassifierConfig:
    architecture: str = "resnet18"
    input_size: int = 512
    patch_size: int = 256  # 0: whole films
    epochs: int = 12
    batch_size: int = 8
    lr: float = 3e-4
    weight_decay: float = 1e-4
    lse_r: float = 4.0
    augment: bool = True
    init_weights: str = ""  # a checkpoint to start the trunk from (encoder, torchvision, triage file)
    seed: int = 0
    max_seconds: float | None = None  # a wall-time cap; the schedule shortens to fit (loop.fit)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs and batch_size must be at least 1 and lr positive")
        if self.patch_size and not 32 <= self.patch_size <= self.input_size:
            raise ValueError(f"patch_size must be 0 or between 32 and input_size ({self.input_size})")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError("max_seconds must be positive")


@dataclass
class TrainingReport:
    device: str
    seconds: float
    images_per_second: float
    epoch_losses: list[float]
    images: int
    abnormal: int
    malignant: int
    init: InitReport | None = None
    config: dict[str, Any] = field(default_factory=dict)
    steps: int = 0
    stopped_by_clock: bool = False  # config.max_seconds ran out before the epochs did

    def summary(self) -> str:
        return (
            f"{self.images} films ({self.abnormal} abnormal, {self.malignant} malignant), "
            f"{len(self.epoch_losses)} epochs on {self.device} in {self.seconds / 60:.1f} min, "
            f"loss {self.epoch_losses[0]:.3f} → {self.epoch_losses[-1]:.3f}"
        )

    def as_meta(self, *, cohort: str = "") -> dict[str, Any]:
        return {
            "cohort": cohort,
            "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "device": self.device,
            "seconds": round(self.seconds, 1),
            "images_per_second": round(self.images_per_second, 2),
            "epochs": len(self.epoch_losses),
            "steps": self.steps,
            "stopped_by_clock": self.stopped_by_clock,
            "loss_history": [round(v, 5) for v in self.epoch_losses],
            "images": self.images,
            "abnormal": self.abnormal,
            "malignant": self.malignant,
            "init": asdict(self.init) if self.init else None,
            "config": self.config,
            "summary": self.summary(),
        }


@dataclass
class _Prepared:
    pixels: torch.Tensor  # 1×S×S, 0..1
    abnormal: float
    malignant: float
    boxes: list[tuple[float, float, float, float]]  # input pixels
    breast: torch.Tensor  # K×2 (y, x) candidate centres inside the breast


def _prepare(items: Sequence[TrainingItem], prep: ClassifierPreprocessing, progress: bool) -> list[_Prepared]:
    out = []
    for item in tqdm(items, desc="prepare", unit="film", disable=not progress, leave=False):
        pixels, _scale, flipped = prepare_film(item.pixels, prep, monochrome1=item.monochrome1)
        shape = item.pixels.shape[:2]
        boxes = [box_to_input(box, shape, prep, flipped) for box in item.boxes]
        coarse = pixels[0, ::8, ::8] > BREAST_LEVEL
        centres = coarse.nonzero().float() * 8 + 4
        if len(centres) == 0:
            centres = torch.tensor([[prep.input_size / 2, prep.input_size / 2]])
        out.append(_Prepared(pixels, float(item.abnormal), float(item.malignant), boxes, centres))
    return out


def _crop(item: _Prepared, size: int, generator: torch.Generator, jitter: bool) -> torch.Tensor:
    """A size×size crop: around a lesion (abnormal with a box) or in the breast."""
    full = item.pixels.shape[-1]
    if item.boxes:
        x0, y0, x1, y1 = item.boxes[int(torch.randint(len(item.boxes), (1,), generator=generator))]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        if jitter:  # keep the lesion inside the patch, not always at its centre
            span = max(0.0, size / 2 - max(x1 - x0, y1 - y0) / 2) * 0.6
            cx += float(torch.empty(1).uniform_(-span, span, generator=generator))
            cy += float(torch.empty(1).uniform_(-span, span, generator=generator))
    else:
        cy, cx = item.breast[int(torch.randint(len(item.breast), (1,), generator=generator))].tolist()
    left = int(round(min(max(cx - size / 2, 0), full - size)))
    top = int(round(min(max(cy - size / 2, 0), full - size)))
    return item.pixels[:, top : top + size, left : left + size]


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random rotation (±12°), scale (0.85–1.15), vertical flip, gamma and contrast, on a
    N×1×H×W batch of 0..1 pictures (on any device)."""
    n = batch.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.empty(n).uniform_(low, high, generator=generator)

    angle = uniform(-12, 12) * math.pi / 180
    scale = uniform(0.85, 1.15)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * flip
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos * flip
    grid = F.affine_grid(theta.to(batch.device), list(batch.shape), align_corners=False)
    out = F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gamma = torch.exp(uniform(math.log(0.7), math.log(1.4))).to(batch.device).view(n, 1, 1, 1)
    contrast = uniform(0.85, 1.15).to(batch.device).view(n, 1, 1, 1)
    out = out.clamp(0, 1).pow(gamma)
    return ((out - 0.5) * contrast + 0.5).clamp(0, 1)


def _pos_weight(labels: Sequence[float]) -> float:
    positives = sum(1 for v in labels if v == 1)
    negatives = sum(1 for v in labels if v == 0)
    return negatives / positives if positives and negatives else 1.0


def classifier_loss(
    logits: torch.Tensor, abnormal: torch.Tensor, malignant: torch.Tensor, pos_weights: tuple[float, float]
) -> torch.Tensor:
    """Weighted BCE on the abnormal head; BCE on the malignant head for films with a
    known pathology only (benign vs malignant among the abnormal)."""
    logits = logits.float()
    loss = F.binary_cross_entropy_with_logits(
        logits[:, 0], abnormal, pos_weight=torch.tensor(pos_weights[0], device=logits.device)
    )
    known = malignant >= 0
    if known.any():
        loss = loss + F.binary_cross_entropy_with_logits(
            logits[known, 1], malignant[known], pos_weight=torch.tensor(pos_weights[1], device=logits.device)
        )
    return loss


def train_classifier(
    items: Sequence[TrainingItem],
    config: ClassifierConfig | None = None,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> tuple[MammoClassifier, TrainingReport]:
    """Train a classifier on labelled films; returns it (CPU, eval mode) and a report."""
    config = config or ClassifierConfig()
    if len(items) < 2:
        raise ValueError(f"training needs at least 2 labelled films, got {len(items)}")
    abnormal = [item.abnormal for item in items]
    if len(set(abnormal)) < 2:
        raise ValueError("training needs normal and abnormal films; the labels have one class only")
    device = torch.device(device) if device is not None else pick_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    prep = ClassifierPreprocessing(input_size=config.input_size)
    model = build_classifier(config.architecture, preprocessing=prep, lse_r=config.lse_r)
    init = init_backbone(model, config.init_weights) if config.init_weights else None
    prepared = _prepare(items, prep, progress)
    weights = (_pos_weight(abnormal), _pos_weight([item.malignant for item in items]))

    model.to(device).to(memory_format=torch.channels_last).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    use_bf16 = device.type == "cuda"
    seen = 0

    def epoch_batches():
        order = torch.randperm(len(prepared), generator=generator).tolist()
        return (
            [prepared[i] for i in order[start : start + config.batch_size]]
            for start in range(0, len(order), config.batch_size)
        )

    def batch_loss(chosen: list[_Prepared]) -> torch.Tensor:
        nonlocal seen
        if config.patch_size:
            pictures = torch.stack([_crop(p, config.patch_size, generator, config.augment) for p in chosen])
        else:
            pictures = torch.stack([p.pixels for p in chosen])
        pictures = pictures.to(device)
        if config.augment:
            pictures = augment(pictures, generator)
        batch = normalise(pictures, prep).contiguous(memory_format=torch.channels_last)
        target_abnormal = torch.tensor([p.abnormal for p in chosen], device=device)
        target_malignant = torch.tensor([p.malignant for p in chosen], device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(batch)
        seen += len(chosen)
        return classifier_loss(logits, target_abnormal, target_malignant, weights)

    run = fit(
        batch_loss,
        optimizer=optimiser,
        epoch_batches=epoch_batches,
        epochs=config.epochs,
        steps_per_epoch=math.ceil(len(prepared) / config.batch_size),
        max_seconds=config.max_seconds,
        warmup=True,
        name="classifier",
        progress=progress,
    )
    losses, seconds = run.losses, run.seconds
    report = TrainingReport(
        device=str(device),
        seconds=seconds,
        images_per_second=seen / seconds if seconds > 0 else 0.0,
        epoch_losses=losses,
        images=len(items),
        abnormal=sum(abnormal),
        malignant=sum(1 for item in items if item.malignant == 1),
        init=init,
        config={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        steps=run.steps,
        stopped_by_clock=run.stopped_by_clock,
    )
    return model.cpu().eval(), report


@torch.no_grad()
def evaluate_loss(model: MammoClassifier, items: Sequence[TrainingItem], *, patch_size: int = 0) -> float:
    """The unweighted loss on films (whole films, or the lesion-centred crop without
    jitter): a fixed yardstick for tests and for comparing runs. The model's mode is
    the caller's: batch statistics (train) or running statistics (eval)."""
    prepared = _prepare(items, model.preprocessing, progress=False)
    generator = torch.Generator().manual_seed(0)
    if patch_size:
        pictures = torch.stack([_crop(p, patch_size, generator, jitter=False) for p in prepared])
    else:
        pictures = torch.stack([p.pixels for p in prepared])
    logits = model(normalise(pictures, model.preprocessing))
    abnormal = torch.tensor([p.abnormal for p in prepared])
    malignant = torch.tensor([p.malignant for p in prepared])
    return float(classifier_loss(logits, abnormal, malignant, (1.0, 1.0)))
