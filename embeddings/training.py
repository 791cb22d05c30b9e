"""Training an encoder here, without a model hub (pure torch; no Django).

Self-supervised SimCLR (NT-Xent over two augmented views of each image) learns from
every image the platform holds, labelled or not; where labels exist (normal/abnormal,
finding class) an optional supervised contrastive term (SupCon) pulls images of one
label together. Images whose label is None only take part in the self-supervised term.

The caller decodes the images (DICOM, PNG) and passes arrays; each is windowed and
downsized once into a cache, and the augmentations run per item in a torch Dataset so
a DataLoader with workers can overlap them with compute.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from embeddings.encoder import (
    DEFAULT_DIM,
    Encoder,
    InitReport,
    Preprocessing,
    TrainingMeta,
    build_encoder,
    init_from_torchvision,
    normalise,
    pick_device,
    prepare,
)

log = logging.getLogger(__name__)

UNLABELLED = -1

# Defaults sized so that the 224 MIAS films at 256² train in about 15 minutes on the
# shared 2-core CPU here even while other jobs load it: measured 686 s for the
# training loop (12 min wall with decoding) at 1.96 training images/s under a load
# of ~4 (each image is two 256² views, forward and backward); 7.5 images/s on a quiet
# machine (~3.5 min). A batch of 16 gives 14 updates per epoch instead of 7 for the
# same compute, which matters more than a larger batch's extra negatives when the
# whole run is under a hundred steps.
DEFAULT_ARCH = "resnet18"
DEFAULT_INPUT_SIZE = 256
DEFAULT_EPOCHS = 6
DEFAULT_BATCH_SIZE = 16
DEFAULT_LR = 1e-3
DEFAULT_TEMPERATURE = 0.2
DEFAULT_SUPERVISED_WEIGHT = 0.5
# On the CPU one worker augments while the main process trains: 10-25 % faster than
# augmenting in the main process on 2 cores (per-image ops run single-threaded in a
# worker, which suits them). On a GPU augmentation is the bottleneck: on an H100 with 16
# cores, 384 films of 1024² at 256², batch 16, trained at 93 and 89 films/s with 1 worker
# (two runs), 337 and 286 with 4, 451 and 403 with 8, 492 and 370 with 15; so there up to
# 8 cores augment (one is left to the training loop).
DEFAULT_NUM_WORKERS = 1
MAX_CUDA_WORKERS = 8


def default_num_workers(device: torch.device) -> int:
    """DataLoader workers for contrastive training on `device` (see DEFAULT_NUM_WORKERS)."""
    if device.type != "cuda":
        return DEFAULT_NUM_WORKERS
    return max(1, min(MAX_CUDA_WORKERS, len(os.sched_getaffinity(0)) - 1))


@dataclass(frozen=True)
class Augmentation:
    """Augmentations that keep a radiograph a plausible radiograph.

    Crops (scale 0.3-1: a lesion is often a small part of the film), left/right flips
    (a left breast mirrored looks like a right one), small rotations (positioning
    varies by a few degrees), gamma and contrast (exposure, film and processing
    differ), noise and slight blur (detector and digitiser). No vertical flips (the
    pectoral muscle and the chest's apex have a side) and no colour jitter (there is
    no colour).
    """

    crop_scale: tuple[float, float] = (0.3, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    rotation: float = 10.0  # degrees, either way
    gamma: tuple[float, float] = (0.7, 1.4)  # log-uniform
    contrast: tuple[float, float] = (0.75, 1.25)
    brightness: float = 0.08  # added offset, either way, on the 0..1 scale
    blur: float = 0.3  # probability
    blur_sigma: tuple[float, float] = (0.1, 1.2)
    noise: float = 0.5  # probability
    noise_sigma: float = 0.02

    def pipeline(self, size: int) -> T.Compose:
        """The geometric part, on a 1×S×S tensor in 0..1 (torch RNG, so seeded by torch)."""
        return T.Compose(
            [
                T.RandomResizedCrop(size, scale=self.crop_scale, ratio=self.crop_ratio, antialias=True),
                T.RandomHorizontalFlip(self.flip),
                T.RandomRotation(self.rotation, interpolation=T.InterpolationMode.BILINEAR, fill=0.0),
                T.RandomApply([T.GaussianBlur(7, sigma=self.blur_sigma)], p=self.blur),
            ]
        )

    def intensity(self, pixels: torch.Tensor) -> torch.Tensor:
        """Gamma, contrast about the mean, brightness, noise; result clipped to 0..1."""
        low, high = math.log(self.gamma[0]), math.log(self.gamma[1])
        gamma = math.exp(low + (high - low) * torch.rand(()).item())
        contrast = self.contrast[0] + (self.contrast[1] - self.contrast[0]) * torch.rand(()).item()
        shift = self.brightness * (2 * torch.rand(()).item() - 1)
        pixels = pixels.clamp(0.0, 1.0) ** gamma
        mean = pixels.mean()
        pixels = (pixels - mean) * contrast + mean + shift
        if torch.rand(()).item() < self.noise:
            pixels = pixels + torch.randn_like(pixels) * self.noise_sigma
        return pixels.clamp_(0.0, 1.0)


class ContrastiveDataset(Dataset):
    """Two augmented views of each image, plus its label index (-1 for unlabelled).

    Images are windowed and downsized once, to `cache_scale` × the input size, and
    kept as float16: crops at scale 0.3 then still have full input resolution, and
    the films themselves need not be held (224 MIAS films: 117 MB instead of 940 MB).
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        label_ids: Sequence[int],
        prep: Preprocessing,
        augmentation: Augmentation,
        *,
        monochrome1: Sequence[bool] | None = None,
        cache_scale: float = 2.0,
    ) -> None:
        cache_size = round(prep.input_size * cache_scale)
        flags = monochrome1 if monochrome1 is not None else [False] * len(images)
        self.cache = [
            prepare(image, prep, monochrome1=flag, size=cache_size).half()
            for image, flag in zip(images, flags, strict=True)
        ]
        self.label_ids = torch.as_tensor(list(label_ids), dtype=torch.long)
        self.prep = prep
        self.geometry = augmentation.pipeline(prep.input_size)
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.cache)

    def view(self, index: int) -> torch.Tensor:
        pixels = self.augmentation.intensity(self.geometry(self.cache[index].float()))
        return normalise(pixels, self.prep)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.view(index), self.view(index), self.label_ids[index]


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each view must pick its partner among the other 2B-1 views."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    batch = len(z1)
    targets = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)]).to(z.device)
    return F.cross_entropy(logits, targets)


def supcon(z: torch.Tensor, label_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) over the labelled rows only.

    Each labelled row is pulled towards the other rows of its label and pushed from
    the rest of the labelled rows; unlabelled rows (-1) are left out entirely, since
    an unlabelled image may well share the anchor's label. Zero (with a graph) when no
    row has a positive.
    """
    keep = label_ids != UNLABELLED
    z, label_ids = F.normalize(z[keep].float(), dim=1), label_ids[keep]
    if len(z) < 2:
        return z.sum() * 0.0
    logits = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = (label_ids[:, None] == label_ids[None, :]) & ~self_mask
    anchors = positives.any(dim=1)
    if not anchors.any():
        return z.sum() * 0.0
    log_prob = logits.log_softmax(dim=1).masked_fill(~positives, 0.0)
    per_anchor = -log_prob.sum(dim=1)[anchors] / positives.sum(dim=1)[anchors]
    return per_anchor.mean()


@dataclass(frozen=True)
class LossParts:
    total: torch.Tensor
    contrastive: torch.Tensor
    supervised: torch.Tensor


class ContrastiveLearner(nn.Module):
    """The encoder plus SimCLR's MLP projection head, which is discarded after training.

    NT-Xent is taken on the head's output (SimCLR: better representations below the
    head); SupCon on the encoder's embedding itself, since that is what search ranks.
    """

    def __init__(
        self,
        encoder: Encoder,
        *,
        temperature: float = DEFAULT_TEMPERATURE,
        supervised_weight: float = DEFAULT_SUPERVISED_WEIGHT,
        head_dim: int = 128,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(
            nn.Linear(encoder.dim, encoder.dim),
            nn.BatchNorm1d(encoder.dim),
            nn.ReLU(inplace=True),
            nn.Linear(encoder.dim, head_dim),
        )
        self.temperature = temperature
        self.supervised_weight = supervised_weight

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, label_ids: torch.Tensor) -> LossParts:
        batch = len(view1)
        # One pass over both views: BatchNorm sees 2B samples, and it is faster.
        embeddings = self.encoder(torch.cat([view1, view2]))
        projected = self.head(embeddings)
        contrastive = nt_xent(projected[:batch], projected[batch:], self.temperature)
        if self.supervised_weight > 0:
            supervised = supcon(embeddings, torch.cat([label_ids, label_ids]), self.temperature)
        else:
            supervised = torch.zeros((), device=embeddings.device)
        return LossParts(contrastive + self.supervised_weight * supervised, contrastive, supervised)


@dataclass
class TrainReport:
    """What a run did, for the log and the weights file's metadata."""

    epoch_losses: list[float]
    contrastive_losses: list[float]
    supervised_losses: list[float]
    seconds: float
    images_per_second: float  # training images per second (each image passes as two views)
    steps: int
    device: str
    settings: dict[str, Any]
    init: InitReport | None = None

    def training_meta(self, *, cohort: str = "", metrics: dict[str, float] | None = None) -> TrainingMeta:
        return TrainingMeta(
            cohort=cohort,
            epochs=len(self.epoch_losses),
            loss_history=[round(v, 5) for v in self.epoch_losses],
            metrics=dict(metrics or {}),
            settings={**self.settings, "seconds": round(self.seconds, 1), "device": self.device},
            init_weights=str(self.settings.get("init_weights") or ""),
        )


def label_indices(labels: Sequence[Hashable | None] | None, count: int) -> tuple[list[int], list[Hashable]]:
    """Labels → (index per image, -1 where None; the sorted distinct labels)."""
    if labels is None:
        return [UNLABELLED] * count, []
    if len(labels) != count:
        raise ValueError(f"got {len(labels)} labels for {count} images")
    classes = sorted({label for label in labels if label is not None}, key=str)
    lookup = {label: i for i, label in enumerate(classes)}
    return [UNLABELLED if label is None else lookup[label] for label in labels], classes


def _schedule(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to zero: the usual SimCLR schedule."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train(
    images: Sequence[np.ndarray],
    labels: Sequence[Hashable | None] | None = None,
    *,
    arch: str = DEFAULT_ARCH,
    dim: int = DEFAULT_DIM,
    input_size: int = DEFAULT_INPUT_SIZE,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    weight_decay: float = 1e-4,
    temperature: float = DEFAULT_TEMPERATURE,
    supervised_weight: float = DEFAULT_SUPERVISED_WEIGHT,
    monochrome1: Sequence[bool] | None = None,
    augmentation: Augmentation | None = None,
    init_weights: str | Path | None = None,
    device: torch.device | str | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    seed: int = 0,
) -> tuple[Encoder, TrainReport]:
    """Train an encoder on decoded images (modality values or 8-bit grey, any size).

    `labels` (one per image, None where unknown) switch on the SupCon term, weighted by
    `supervised_weight`; without labels training is purely self-supervised.
    `init_weights` starts the backbone from a user-provided checkpoint
    (`init_from_torchvision`) instead of random init. On CUDA: bf16 autocast and
    channels_last. On the CPU: fp32 with channels_last, since bf16 autocast made a
    training step twice as slow here (ResNet-18 256²: 2.3 vs 4.5 views/s), although
    it speeds up inference.
    `num_workers` DataLoader workers augment while the model trains (0: in the main
    process; None: `default_num_workers(device)`).
    Returns the trained encoder (on the CPU, eval mode) and a report.
    """
    if len(images) < 2:
        raise ValueError("contrastive training needs at least 2 images")
    if epochs < 1 or batch_size < 2:
        raise ValueError(f"need epochs >= 1 and batch_size >= 2, got {epochs} and {batch_size}")
    torch.manual_seed(seed)
    device = torch.device(device) if device is not None else pick_device()
    on_cuda = device.type == "cuda"
    if num_workers is None:
        num_workers = default_num_workers(device)
    prep = Preprocessing(input_size=input_size)
    encoder = build_encoder(arch, dim=dim, preprocessing=prep)
    if not isinstance(encoder, Encoder):
        raise ValueError(f"{arch} has nothing to train")
    init = init_from_torchvision(encoder, init_weights) if init_weights else None

    label_ids, classes = label_indices(labels, len(images))
    augmentation = augmentation or Augmentation()
    dataset = ContrastiveDataset(images, label_ids, prep, augmentation, monochrome1=monochrome1)
    batch_size = min(batch_size, len(dataset))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,  # NT-Xent and BatchNorm need full batches; a 1-image tail breaks BN
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=on_cuda,
        generator=torch.Generator().manual_seed(seed),
    )
    learner = ContrastiveLearner(encoder, temperature=temperature, supervised_weight=supervised_weight)
    learner.to(device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(learner.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = len(loader)
    total_steps = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total_steps, min(steps_per_epoch, total_steps)))

    settings = {
        "arch": arch,
        "dim": dim,
        "input_size": input_size,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "temperature": temperature,
        "supervised_weight": supervised_weight,
        "classes": [str(c) for c in classes],
        "labelled": sum(1 for i in label_ids if i != UNLABELLED),
        "images": len(images),
        "augmentation": asdict(augmentation),
        "init_weights": str(init_weights) if init_weights else "",
        "num_workers": num_workers,
        "seed": seed,
    }
    log.info("training %s on %d images (%d labelled) on %s", arch, len(images), settings["labelled"], device)
    totals: dict[str, list[float]] = {"total": [], "contrastive": [], "supervised": []}
    started = time.perf_counter()
    bar = tqdm(total=total_steps, desc=f"train {arch}", unit="step", disable=not progress)
    for epoch in range(1, epochs + 1):
        sums = dict.fromkeys(totals, 0.0)
        for view1, view2, batch_labels in loader:
            view1 = view1.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            view2 = view2.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda):
                losses = learner(view1, view2, batch_labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            losses.total.backward()
            optimizer.step()
            scheduler.step()
            for name in totals:
                sums[name] += float(getattr(losses, name).detach())
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{float(losses.total.detach()):.3f}")
        for name in totals:
            totals[name].append(sums[name] / steps_per_epoch)
        log.info(
            "epoch %d/%d: loss %.4f (contrastive %.4f, supervised %.4f), %.0f s",
            epoch,
            epochs,
            totals["total"][-1],
            totals["contrastive"][-1],
            totals["supervised"][-1],
            time.perf_counter() - started,
        )
    bar.close()
    seconds = time.perf_counter() - started

    encoder = learner.encoder.cpu().to(memory_format=torch.contiguous_format).eval()
    report = TrainReport(
        epoch_losses=totals["total"],
        contrastive_losses=totals["contrastive"],
        supervised_losses=totals["supervised"],
        seconds=seconds,
        images_per_second=total_steps * batch_size / seconds if seconds > 0 else 0.0,
        steps=total_steps,
        device=str(device),
        settings=settings,
        init=init,
    )
    return encoder, report
