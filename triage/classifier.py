"""The mammogram classifier: P(abnormal) and P(malignant) per image, combined per breast
and per exam. Pure torch + numpy (no Django): training, the worker and the commands
share it.

Network. A torchvision ResNet trunk (weights=None, one input channel) without its
pooling, a 1×1 convolution giving two score maps, and log-sum-exp pooling over the
map (Pinheiro & Collobert 2015): between mean pooling (r→0) and max pooling (r→∞), so
one small lesion can drive the image score (as max pooling would) while every
location still gets a gradient (which pure max pooling denies). Being fully
convolutional, the same weights score a lesion-centred patch during training and the
whole film at inference, as in patch-to-whole-image mammography classifiers
(Shen et al. 2019).

Outputs are hierarchical: logit 0 is abnormal-vs-normal, logit 1 is malignant given
abnormal (trained on abnormal images only). P(malignant) = P(abnormal) ·
P(malignant | abnormal), so it can never exceed P(abnormal), and benign lesions teach
the abnormal head without teaching it that benign means normal.

Input. The film windowed from its own pixel percentiles, resized so that its long
side is `input_size` (≥ 512 px: small masses and calcification clusters survive)
with the aspect ratio kept and zero padding (embeddings.encoder.prepare), then turned
so the chest wall is on the left (decided from the pixels, not from a laterality tag
that digitised films often lack): the network then sees one orientation of breast,
which halves what it has to learn from a few hundred films.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn

from embeddings.encoder import Preprocessing, pick_device, prepare, to_grey

from .weights import InitReport, ModelFileError, ModelMeta, init_trunk

CLASSES = ("abnormal", "malignant")
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
}
MIN_INPUT_SIZE = 512


@dataclass(frozen=True)
class ClassifierPreprocessing:
    """How a film becomes the classifier's input; saved beside the weights."""

    input_size: int = 512  # long side, pixels
    window_percentiles: tuple[float, float] = (0.5, 99.5)
    mean: float = 0.449
    std: float = 0.226
    orient: bool = True  # chest wall to the left, from the pixels

    def __post_init__(self) -> None:
        low, high = self.window_percentiles
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(f"window_percentiles must satisfy 0 <= low < high <= 100, got {self.window_percentiles}")
        if self.input_size < MIN_INPUT_SIZE:
            raise ValueError(f"input_size must be at least {MIN_INPUT_SIZE} px (small lesions), got {self.input_size}")
        if self.std <= 0:
            raise ValueError("std must be positive")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["window_percentiles"] = list(self.window_percentiles)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassifierPreprocessing:
        known = {"input_size", "window_percentiles", "mean", "std", "orient"}
        unknown = set(data) - known
        if unknown:
            raise ModelFileError(f"unknown preprocessing settings {sorted(unknown)}: written by a newer version?")
        values = dict(data)
        if "window_percentiles" in values:
            values["window_percentiles"] = tuple(float(v) for v in values["window_percentiles"])
        return cls(**values)


# --- preprocessing ------------------------------------------------------------------------


def breast_on_right(pixels: torch.Tensor) -> bool:
    """Whether most of the tissue (bright, windowed 0..1) lies in the right half."""
    half = pixels.shape[-1] // 2
    return bool(pixels[..., half:].sum() > pixels[..., :half].sum())


def prepare_film(
    image: np.ndarray, prep: ClassifierPreprocessing, *, monochrome1: bool = False
) -> tuple[torch.Tensor, float, bool]:
    """A film (modality values or display grey) → (1×S×S windowed 0..1, scale, flipped).

    `scale` maps image pixels to input pixels (before padding) and `flipped` says the
    picture was mirrored, so boxes can be carried along (`box_to_input`)."""
    grey = to_grey(image)
    rows, cols = grey.shape
    pixels = prepare(grey, _encoder_prep(prep), monochrome1=monochrome1)
    flipped = prep.orient and breast_on_right(pixels)
    if flipped:
        pixels = pixels.flip(-1)
    return pixels, prep.input_size / max(rows, cols), flipped


def _encoder_prep(prep: ClassifierPreprocessing) -> Preprocessing:
    return Preprocessing(
        input_size=prep.input_size, window_percentiles=prep.window_percentiles, mean=prep.mean, std=prep.std
    )


def box_to_input(
    box: Sequence[float], image_shape: tuple[int, int], prep: ClassifierPreprocessing, flipped: bool
) -> tuple[float, float, float, float]:
    """A box in image pixels → the same box on `prepare_film`'s output."""
    rows, cols = image_shape
    scale = prep.input_size / max(rows, cols)
    new_rows, new_cols = round(rows * scale), round(cols * scale)
    top, left = (prep.input_size - new_rows) // 2, (prep.input_size - new_cols) // 2
    x0, y0, x1, y1 = (float(v) * scale for v in box)
    x0, x1 = x0 + left, x1 + left
    y0, y1 = y0 + top, y1 + top
    if flipped:
        x0, x1 = prep.input_size - x1, prep.input_size - x0
    return x0, y0, x1, y1


def normalise(pixels: torch.Tensor, prep: ClassifierPreprocessing) -> torch.Tensor:
    return (pixels - prep.mean) / prep.std


# --- the network --------------------------------------------------------------------------


class MammoClassifier(nn.Module):
    """ResNet trunk → 1×1 conv score maps → LSE pooling → [abnormal, malignant|abnormal] logits."""

    def __init__(self, architecture: str, preprocessing: ClassifierPreprocessing, lse_r: float = 4.0) -> None:
        super().__init__()
        try:
            factory = ARCHITECTURES[architecture]
        except KeyError:
            raise ValueError(f"unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}") from None
        if lse_r <= 0:
            raise ValueError(f"lse_r must be positive, got {lse_r}")
        net = factory(weights=None)
        stem = net.conv1
        net.conv1 = nn.Conv2d(1, stem.out_channels, stem.kernel_size, stem.stride, stem.padding, bias=False)
        feature_dim = net.fc.in_features
        net.fc = nn.Identity()
        # Named `backbone` with torchvision's own keys, so the search encoder's file
        # (whose trunk is `backbone.*` too) and torchvision checkpoints load into it.
        self.backbone = net
        self.head = nn.Conv2d(feature_dim, len(CLASSES), kernel_size=1)
        self.architecture = architecture
        self.preprocessing = preprocessing
        self.lse_r = float(lse_r)

    def score_map(self, x: torch.Tensor) -> torch.Tensor:
        """N×1×H×W (normalised) → N×2×h×w logits per location (stride 32)."""
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        x = b.layer4(b.layer3(b.layer2(b.layer1(x))))
        return self.head(x)

    def pool(self, maps: torch.Tensor) -> torch.Tensor:
        """LSE pooling: (1/r)·log(mean(exp(r·s))), numerically stable."""
        flat = maps.float().flatten(2)
        r = self.lse_r
        return (torch.logsumexp(r * flat, dim=2) - math.log(flat.shape[2])) / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.score_map(x))


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """N×2 logits → N×2 [P(abnormal), P(malignant)] with P(malignant) ≤ P(abnormal)."""
    p = torch.sigmoid(logits.float())
    return torch.stack([p[:, 0], p[:, 0] * p[:, 1]], dim=1)


def build_classifier(
    architecture: str = "resnet18", *, preprocessing: ClassifierPreprocessing | None = None, lse_r: float = 4.0
) -> MammoClassifier:
    return MammoClassifier(architecture, preprocessing or ClassifierPreprocessing(), lse_r=lse_r)


def classifier_meta(
    model: MammoClassifier, *, training: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None
) -> ModelMeta:
    return ModelMeta(
        kind="classifier",
        architecture=model.architecture,
        classes=CLASSES,
        config={"lse_r": model.lse_r, "outputs": "abnormal, malignant given abnormal (logits)"},
        preprocessing=model.preprocessing.to_dict(),
        training=dict(training or {}),
        metrics=dict(metrics or {}),
    )


def build_from_meta(meta: ModelMeta) -> MammoClassifier:
    """The untrained network a weights file's metadata describes (load the state into it)."""
    if meta.kind != "classifier":
        raise ModelFileError(f"expected a classifier file, got a {meta.kind}")
    if tuple(meta.classes) != CLASSES:
        raise ModelFileError(f"classifier classes {list(meta.classes)} are not {list(CLASSES)}")
    try:
        return build_classifier(
            meta.architecture,
            preprocessing=ClassifierPreprocessing.from_dict(meta.preprocessing),
            lse_r=float(meta.config.get("lse_r", 4.0)),
        )
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"inconsistent classifier metadata: {str(exc).splitlines()[0][:200]}") from None


# --- starting from other weights (transfer learning) -------------------------------------


def init_backbone(model: MammoClassifier, path: str | os.PathLike[str]) -> InitReport:
    """Start the classifier's trunk from a checkpoint: a Precedent search-encoder file,
    a triage file, or a torchvision state_dict (e.g. ImageNet weights copied in); see
    `weights.init_trunk`."""
    return init_trunk(model.backbone, path, architecture=model.architecture)


# --- scoring -------------------------------------------------------------------------------


@torch.no_grad()
def score_images(
    model: MammoClassifier,
    images: Sequence[np.ndarray],
    *,
    monochrome1: Sequence[bool] | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 8,
) -> np.ndarray:
    """Films → N×2 float [P(abnormal), P(malignant)], in eval mode, bf16 autocast on CUDA."""
    device = torch.device(device) if device is not None else pick_device()
    if len(images) == 0:
        return np.zeros((0, 2), dtype=np.float32)
    flags = list(monochrome1) if monochrome1 is not None else [False] * len(images)
    was_training = model.training
    model.to(device).eval().to(memory_format=torch.channels_last)
    out = []
    try:
        for start in range(0, len(images), batch_size):
            batch = torch.stack(
                [
                    normalise(prepare_film(img, model.preprocessing, monochrome1=m)[0], model.preprocessing)
                    for img, m in zip(
                        images[start : start + batch_size], flags[start : start + batch_size], strict=True
                    )
                ]
            )
            batch = batch.to(device).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(batch)
            out.append(probabilities(logits).cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out).astype(np.float32)


# --- combining images into breasts and exams -------------------------------------------


@dataclass(frozen=True)
class ImageScore:
    key: str  # e.g. the SOP Instance UID
    laterality: str  # "L", "R" or "" (unknown)
    p_abnormal: float
    p_malignant: float


def breast_side(laterality: str) -> str:
    """The breast an image belongs to: "L", "R", or "?" when its laterality is unknown."""
    side = laterality.upper()[:1] if laterality else "?"
    return side if side in ("L", "R") else "?"


def combine(images: Sequence[ImageScore]) -> dict[str, Any]:
    """Per-breast and per-exam scores: the MAX over the images of a breast, and over
    the breasts of an exam.

    Max, not mean: triage rules exams out, so what must not happen is a lesion seen on
    one view only (a mass hidden by overlap on CC, a calcification cluster at the edge
    of MLO) being averaged away by the views that look normal. An exam is abnormal
    when one breast is; a breast when one view shows it. The price is more false
    positives as the number of images grows, which the operating point absorbs since
    it is calibrated on exams scored the same way. Images of unknown laterality form
    their own group ("?")."""
    breasts: dict[str, dict[str, float]] = {}
    for image in images:
        current = breasts.setdefault(breast_side(image.laterality), {"p_abnormal": 0.0, "p_malignant": 0.0})
        current["p_abnormal"] = max(current["p_abnormal"], float(image.p_abnormal))
        current["p_malignant"] = max(current["p_malignant"], float(image.p_malignant))
    exam = {
        "p_abnormal": max((b["p_abnormal"] for b in breasts.values()), default=0.0),
        "p_malignant": max((b["p_malignant"] for b in breasts.values()), default=0.0),
    }
    return {
        "exam": {k: round(v, 6) for k, v in exam.items()},
        "breasts": {side: {k: round(v, 6) for k, v in values.items()} for side, values in sorted(breasts.items())},
        "images": {
            image.key: {
                "laterality": image.laterality,
                "p_abnormal": round(float(image.p_abnormal), 6),
                "p_malignant": round(float(image.p_malignant), 6),
            }
            for image in images
        },
        "combination": "max",
    }


__all__ = [
    "CLASSES",
    "ClassifierPreprocessing",
    "ImageScore",
    "InitReport",
    "MammoClassifier",
    "box_to_input",
    "build_classifier",
    "breast_side",
    "build_from_meta",
    "classifier_meta",
    "combine",
    "init_backbone",
    "prepare_film",
    "probabilities",
    "score_images",
]
