"""Image encoders for similar-case search: builders, preprocessing, weights files.

No Django here (pure torch + numpy): commands, workers and the API share it.

An encoder maps one grey image to a unit vector of `dim` floats, so that cosine
similarity (inner product) ranks similar cases. The CNN encoders are torchvision
architectures built with `weights=None` (no model hub is reachable) whose first
convolution takes one channel. `raw-pixels` is the no-learning baseline that shows
what a CNN adds.

Weights travel with their `Preprocessing` and metadata in one file, as torchvision's
`Weights` carry their transforms: an embedding is only comparable with embeddings made
by the same weights *and* the same preprocessing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from precedent.files import atomic_write

log = logging.getLogger(__name__)

FORMAT = "precedent-encoder"
FORMAT_VERSION = 1
DEFAULT_DIM = 512
THREADS_ENV = "PRECEDENT_TORCH_THREADS"
# Padding and the border a rotation leaves are "no signal": black after windowing,
# which is what the air around a breast or a chest looks like.
PAD_VALUE = 0.0
# How a backbone's feature map becomes one vector. "avg" is global average pooling
# (torchvision's own, what training uses); "max" and "gem" (generalised mean, p=GEM_P)
# let a small bright finding that fires a few cells carry the whole-image embedding
# instead of being averaged away by the rest of the breast.
POOLINGS = ("avg", "max", "gem")
GEM_P = 3.0
# ITU-R BT.601 luma, as Pillow's convert("L") uses: a colour upload of a grey image
# gives back (almost) the grey values a radiologist saw.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class EncoderFileError(ValueError):
    """A weights file that cannot be used, with the reason in one line."""


# --- preprocessing --------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network's input; saved beside the weights.

    Modality values are windowed to 0..1 with a window from the image's own
    percentiles, which is robust to the very different value ranges of CR, DX, MG and
    digitised film (a file's VOI window is a display choice and often absent).
    The aspect ratio is kept by padding to a square: squashing a mammogram changes
    the shapes of the very masses we want to match. `mean`/`std` are the grey
    equivalents of ImageNet's (the means of its RGB statistics), so a backbone
    initialised from ImageNet weights with summed RGB kernels sees inputs on the scale
    it was trained on.

    Whole images may be embedded at a larger size than the network was trained on
    (`image_size`, the film's long side; 0 = `input_size`) with the feature map pooled
    by `image_pooling`: the convolutions slide over the film at twice the resolution
    like overlapping tiles, and max pooling lets one lesion dominate the vector.
    Regions (lesion boxes) are always cropped, resized to `input_size` and
    average-pooled, as in training.
    """

    input_size: int = 256
    window_percentiles: tuple[float, float] = (0.5, 99.5)
    mean: float = 0.449
    std: float = 0.226
    region_margin: float = 0.15  # context around a lesion box, per side, as a share of the box
    image_size: int = 0
    image_pooling: str = "avg"

    def __post_init__(self) -> None:
        low, high = self.window_percentiles
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(f"window_percentiles must satisfy 0 <= low < high <= 100, got {self.window_percentiles}")
        if self.input_size < 8 or self.std <= 0 or self.region_margin < 0:
            raise ValueError(f"invalid preprocessing: {self}")
        if self.image_pooling not in POOLINGS:
            raise ValueError(f"image_pooling must be one of {', '.join(POOLINGS)}, got {self.image_pooling!r}")
        if self.image_size != 0 and self.image_size < 8:
            raise ValueError(f"image_size must be 0 (= input_size) or at least 8, got {self.image_size}")

    @property
    def whole_image_size(self) -> int:
        """The square side a whole image is embedded at."""
        return self.image_size or self.input_size

    def to_dict(self) -> dict[str, Any]:
        """Whole-image settings at their defaults are left out, so a file with the
        plain whole-image preprocessing stays readable by versions that predate them
        (`from_dict` refuses keys it does not know)."""
        data = asdict(self)
        data["window_percentiles"] = list(self.window_percentiles)
        defaults = Preprocessing()
        for name in ("image_size", "image_pooling"):
            if data[name] == getattr(defaults, name):
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        """Refuses keys it does not know: a preprocessing step silently dropped would
        make embeddings that look valid and match nothing."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise EncoderFileError(f"unknown preprocessing settings {sorted(unknown)}: written by a newer version?")
        values = dict(data)
        if "window_percentiles" in values:
            values["window_percentiles"] = tuple(float(v) for v in values["window_percentiles"])
        return cls(**values)


Box = tuple[float, float, float, float]


def to_grey(image: np.ndarray) -> np.ndarray:
    """H×W (any numeric type) or H×W×3/4 colour (uint8 display values) → float32 H×W."""
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        return image[..., :3].astype(np.float32) @ _LUMA
    if image.ndim != 2:
        raise ValueError(f"expected a grey H×W or colour H×W×3 image, got shape {image.shape}")
    return image.astype(np.float32, copy=False)


def percentile_window(grey: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    """(low, high) modality values that map to black and white.

    Percentiles come from a strided sample of at most ~512² pixels (as
    `studies.dicom.auto_window` does): exact enough, and cheap on a 4736×2624 film.
    """
    sample = grey[:: max(1, grey.shape[0] // 512), :: max(1, grey.shape[1] // 512)]
    low, high = (float(v) for v in np.percentile(sample, percentiles))
    if high <= low:  # a nearly constant image: use the whole range, if any
        low, high = float(grey.min()), float(grey.max())
    return low, high


def crop_bounds(shape: tuple[int, int], box: Box, margin: float) -> tuple[int, int, int, int]:
    """Pixel bounds (x0, y0, x1, y1; x1/y1 exclusive) of a box plus its context margin,
    clamped to the image. Raises ValueError for an empty box or one outside the image."""
    rows, cols = shape
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(np.isfinite([x0, y0, x1, y1])) or x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {tuple(box)} has no area: expected x0 < x1 and y0 < y1")
    if x1 <= 0 or y1 <= 0 or x0 >= cols or y0 >= rows:
        raise ValueError(f"box {tuple(box)} lies outside the {cols}×{rows} image")
    dx, dy = (x1 - x0) * margin, (y1 - y0) * margin
    left, top = max(0, int(np.floor(x0 - dx))), max(0, int(np.floor(y0 - dy)))
    right, bottom = min(cols, int(np.ceil(x1 + dx))), min(rows, int(np.ceil(y1 + dy)))
    return left, top, right, bottom


def prepare(
    image: np.ndarray,
    prep: Preprocessing,
    *,
    box: Box | None = None,
    monochrome1: bool = False,
    size: int | None = None,
) -> torch.Tensor:
    """Windowed 0..1 square image (1×S×S float32), before normalisation.

    S is `size`, else `prep.input_size` for a box and `prep.whole_image_size` for the
    whole image; training asks for a larger S to crop from. The
    window comes from the whole image even when `box` crops a region, so a lesion
    keeps the grey values it has on the full image (a window stretched over a small
    crop would make every crop look high-contrast). Resizing comes before windowing
    because it is then done on S² instead of all of a large film's pixels; the
    antialiasing filter has no negative lobes, so clipping afterwards is equivalent.
    """
    size = size or (prep.input_size if box is not None else prep.whole_image_size)
    grey = to_grey(image)
    low, high = percentile_window(grey, prep.window_percentiles)
    if box is not None:
        left, top, right, bottom = crop_bounds(grey.shape, box, prep.region_margin)
        grey = grey[top:bottom, left:right]
    rows, cols = grey.shape
    scale = size / max(rows, cols)
    new_rows, new_cols = max(1, min(size, round(rows * scale))), max(1, min(size, round(cols * scale)))
    grey = np.ascontiguousarray(grey)
    if not grey.flags.writeable:  # e.g. np.asarray of a Pillow upload: torch wants to own writable memory
        grey = grey.copy()
    pixels = torch.from_numpy(grey)[None, None]
    if (new_rows, new_cols) != (rows, cols):
        pixels = F.interpolate(pixels, size=(new_rows, new_cols), mode="bilinear", antialias=True, align_corners=False)
    pixels = ((pixels - low) / max(high - low, 1e-6)).clamp_(0.0, 1.0)
    if monochrome1:  # more attenuation is always brighter, as on a MONOCHROME2 display
        pixels = 1.0 - pixels
    pad_top, pad_left = (size - new_rows) // 2, (size - new_cols) // 2
    pixels = F.pad(pixels, (pad_left, size - new_cols - pad_left, pad_top, size - new_rows - pad_top), value=PAD_VALUE)
    return pixels[0]


def normalise(pixels: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    return (pixels - prep.mean) / prep.std


def preprocess(
    image: np.ndarray,
    prep: Preprocessing,
    box: Box | None = None,
    *,
    monochrome1: bool = False,
) -> torch.Tensor:
    """Modality values (or a colour upload) → the encoder's input, 1×S×S float32
    (S: `prep.input_size` for a box, `prep.whole_image_size` for the whole image).

    `image` is what `studies.dicom.decode_frame` returns (float modality values, or
    uint8 RGB) or a decoded PNG/JPEG. `box=(x0, y0, x1, y1)` in image pixels embeds a
    region (a lesion) with `prep.region_margin` of context around it. Embed the
    result with `embed_batch(..., pooling=pooling_for(prep, box))`.
    `monochrome1` inverts the grey scale (PhotometricInterpretation MONOCHROME1).
    """
    return normalise(prepare(image, prep, box=box, monochrome1=monochrome1), prep)


def pooling_for(prep: Preprocessing, box: Box | None = None) -> str:
    """How the feature map of `preprocess(image, prep, box)` is pooled."""
    return "avg" if box is not None else prep.image_pooling


def pool_features(feature_map: torch.Tensor, pooling: str) -> torch.Tensor:
    """N×C×h×w → N×C. The maps are post-ReLU (non-negative), as GeM needs."""
    if pooling == "avg":
        return feature_map.mean(dim=(2, 3))
    if pooling == "max":
        return feature_map.amax(dim=(2, 3))
    if pooling == "gem":
        return feature_map.float().clamp(min=1e-6).pow(GEM_P).mean(dim=(2, 3)).pow(1.0 / GEM_P)
    raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")


# --- models ---------------------------------------------------------------------------


class BaseEncoder(nn.Module):
    """What every encoder carries besides its weights: name, output size, preprocessing."""

    def __init__(self, architecture: str, dim: int, preprocessing: Preprocessing) -> None:
        super().__init__()
        self.architecture = architecture
        self.dim = dim
        self.preprocessing = preprocessing


class Encoder(BaseEncoder):
    """CNN backbone → global average pooling → linear projection → L2 normalisation.

    The projection is linear, not an MLP: SimCLR found that a non-linear head learns to
    discard what the augmentations vary (orientation, contrast, position), which a
    radiologist comparing cases may care about, so training puts its MLP head on top
    of this embedding and throws it away afterwards. The linear layer keeps D
    independent of the backbone width (512 for ResNet-18, 2048 for ResNet-50, 1024
    for DenseNet-121) so indexes need not change with the architecture.
    """

    def __init__(
        self,
        architecture: str,
        backbone: nn.Module,
        feature_dim: int,
        dim: int,
        preprocessing: Preprocessing,
        first_conv: str,
    ) -> None:
        super().__init__(architecture, dim, preprocessing)
        self.backbone = backbone
        self.projection = nn.Linear(feature_dim, dim)
        self.first_conv = first_conv  # backbone key prefix of the 1-channel stem

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's last feature map (N×C×h×w, after its final ReLU), unpooled."""
        net = self.backbone
        if isinstance(net, torchvision.models.ResNet):
            x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
            return net.layer4(net.layer3(net.layer2(net.layer1(x))))
        if isinstance(net, torchvision.models.DenseNet):
            return F.relu(net.features(x))
        raise TypeError(f"no feature map for {type(net).__name__}")

    def forward(self, x: torch.Tensor, pooling: str = "avg") -> torch.Tensor:
        # "avg" runs torchvision's own forward, exactly as the weights were trained.
        features = self.backbone(x) if pooling == "avg" else pool_features(self.feature_map(x), pooling)
        return F.normalize(self.projection(features).float(), dim=1)


class RawPixelEncoder(BaseEncoder):
    """Baseline without learning: the image averaged down to grid×grid, flattened,
    projected to D by a fixed random orthogonal matrix (distances are kept, up to the
    dropped directions), L2-normalised. Whatever a CNN scores above this is what it
    learned."""

    def __init__(self, dim: int, preprocessing: Preprocessing, grid: int = 32, seed: int = 0) -> None:
        super().__init__("raw-pixels", dim, preprocessing)
        self.grid = grid
        features = grid * grid
        if dim > features:
            raise ValueError(f"raw-pixels gives at most {features} dims at grid {grid}, asked for {dim}")
        generator = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(features, features, generator=generator))
        self.register_buffer("basis", q[:, :dim].contiguous())

    def forward(self, x: torch.Tensor, pooling: str = "avg") -> torch.Tensor:
        # No feature map to pool: the grid average is the same at any pooling.
        pooled = F.adaptive_avg_pool2d(x.float(), self.grid).flatten(1)
        return F.normalize(pooled @ self.basis, dim=1)


def _one_channel(conv: nn.Conv2d) -> nn.Conv2d:
    return nn.Conv2d(
        1,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        bias=conv.bias is not None,
    )


def _resnet(factory: Callable[..., nn.Module]) -> Callable[[int, Preprocessing], Encoder]:
    def build(dim: int, preprocessing: Preprocessing) -> Encoder:
        net = factory(weights=None)
        net.conv1 = _one_channel(net.conv1)
        feature_dim = net.fc.in_features
        net.fc = nn.Identity()  # torchvision's forward already pools and flattens
        return Encoder(factory.__name__, net, feature_dim, dim, preprocessing, first_conv="conv1")

    return build


def _densenet(factory: Callable[..., nn.Module]) -> Callable[[int, Preprocessing], Encoder]:
    def build(dim: int, preprocessing: Preprocessing) -> Encoder:
        net = factory(weights=None)
        net.features.conv0 = _one_channel(net.features.conv0)
        feature_dim = net.classifier.in_features
        net.classifier = nn.Identity()
        return Encoder(factory.__name__, net, feature_dim, dim, preprocessing, first_conv="features.conv0")

    return build


ARCHITECTURES: dict[str, Callable[[int, Preprocessing], BaseEncoder]] = {
    "resnet18": _resnet(torchvision.models.resnet18),
    "resnet50": _resnet(torchvision.models.resnet50),
    "densenet121": _densenet(torchvision.models.densenet121),
    "raw-pixels": lambda dim, preprocessing: RawPixelEncoder(dim, preprocessing),
}


def build_encoder(
    architecture: str, *, dim: int = DEFAULT_DIM, preprocessing: Preprocessing | None = None
) -> BaseEncoder:
    """A freshly initialised encoder (random weights; raw-pixels has none to learn)."""
    try:
        builder = ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(f"unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}") from None
    if dim < 1:
        raise ValueError(f"dim must be positive, got {dim}")
    return builder(dim, preprocessing or Preprocessing())


# --- weights files --------------------------------------------------------------------


@dataclass
class TrainingMeta:
    """Where the weights came from and how good they were, for the EncoderVersion row."""

    cohort: str = ""
    trained_at: str = ""  # ISO 8601, UTC; filled in by save_encoder when empty
    epochs: int = 0
    loss_history: list[float] = field(default_factory=list)  # one mean loss per epoch
    metrics: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    init_weights: str = ""  # the checkpoint the backbone started from, if any


@dataclass(frozen=True)
class EncoderMeta:
    architecture: str
    dim: int
    preprocessing: Preprocessing
    training: TrainingMeta
    torch_version: str
    torchvision_version: str
    state_sha256: str  # of the weights only: the identity of a model version
    format_version: int = FORMAT_VERSION


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes of a state_dict, in key order.

    Independent of pickling details, so the same weights give the same digest
    whichever torch version wrote the file.
    """
    digest = hashlib.sha256()
    for name, tensor in state.items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_encoder(path: str | os.PathLike[str], model: BaseEncoder, meta: TrainingMeta | None = None) -> EncoderMeta:
    """Write weights, preprocessing and metadata to one file, atomically.

    The file is written beside its destination and renamed over it, so a reader (a
    worker loading the active version) never sees half a file.
    """
    path = Path(path)
    training = meta or TrainingMeta()
    if not training.trained_at:
        training = replace(training, trained_at=datetime.now(UTC).isoformat(timespec="seconds"))
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    info = EncoderMeta(
        architecture=model.architecture,
        dim=model.dim,
        preprocessing=model.preprocessing,
        training=training,
        torch_version=str(torch.__version__),  # a TorchVersion, which weights_only loading refuses
        torchvision_version=str(torchvision.__version__),
        state_sha256=state_digest(state),
    )
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": info.architecture,
        "dim": info.dim,
        "preprocessing": info.preprocessing.to_dict(),
        "training": asdict(training),
        "torch_version": info.torch_version,
        "torchvision_version": info.torchvision_version,
        "state_sha256": info.state_sha256,
        "state_dict": state,
    }
    atomic_torch_save(path, payload)
    return info


def atomic_torch_save(path: Path, payload: Any) -> None:
    """torch.save to a temp file beside `path`, fsync, rename: a reader (or a crash)
    never sees half a weights file."""
    with atomic_write(path) as fh:
        torch.save(payload, fh)


def _read_checkpoint(path: Path) -> Any:
    # weights_only: a weights file from elsewhere must not be able to run code on load.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EncoderFileError(f"{path.name} is not a readable torch weights file: {first[:200]}") from None


def load_encoder(path: str | os.PathLike[str]) -> tuple[BaseEncoder, EncoderMeta]:
    """Read a file written by `save_encoder`; the model comes back on the CPU, in eval mode.

    Anything else (a torchvision checkpoint, another program's file, a damaged copy)
    is refused with the reason: a torchvision state_dict is a starting point for
    training (`init_from_torchvision`), not an encoder whose embeddings mean anything.
    """
    path = Path(path)
    payload = _read_checkpoint(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        hint = ""
        if isinstance(payload, dict) and all(isinstance(v, torch.Tensor) for v in payload.values()):
            hint = " (it looks like a plain state_dict: use it to initialise training, e.g. --weights)"
        raise EncoderFileError(f"{path.name} is not a Precedent encoder file{hint}")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise EncoderFileError(f"{path.name} has encoder file format {version}; this version reads {FORMAT_VERSION}")
    try:
        prep = Preprocessing.from_dict(payload["preprocessing"])
        training = TrainingMeta(**payload["training"])
        model = build_encoder(payload["architecture"], dim=int(payload["dim"]), preprocessing=prep)
        state = payload["state_dict"]
        digest = state_digest(state)
        if digest != payload["state_sha256"]:
            raise EncoderFileError(f"{path.name}: weights checksum mismatch, the file is damaged")
        model.load_state_dict(state, strict=True)
    except EncoderFileError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise EncoderFileError(
            f"{path.name} is an inconsistent encoder file: {str(exc).splitlines()[0][:200]}"
        ) from None
    meta = EncoderMeta(
        architecture=model.architecture,
        dim=model.dim,
        preprocessing=prep,
        training=training,
        torch_version=str(payload.get("torch_version", "")),
        torchvision_version=str(payload.get("torchvision_version", "")),
        state_sha256=digest,
        format_version=version,
    )
    return model.eval(), meta


@dataclass(frozen=True)
class InitReport:
    """What `init_from_torchvision` took from a checkpoint."""

    loaded: list[str]  # backbone keys set from the checkpoint
    adapted: list[str]  # loaded after conversion (RGB stem → one channel)
    missing: list[str]  # backbone keys the checkpoint lacked: left at random init
    skipped: list[str]  # checkpoint keys not used (classifier, wrong shapes, other nets)


# torchvision's DenseNet checkpoints name "norm.1" what its modules call "norm1".
_DENSENET_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _checkpoint_state(payload: Any) -> dict[str, torch.Tensor]:
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        prefix = "backbone."
        return {k[len(prefix) :]: v for k, v in payload["state_dict"].items() if k.startswith(prefix)}
    for key in ("state_dict", "model"):  # common wrappers of training checkpoints
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
    if not isinstance(payload, dict):
        raise EncoderFileError("the checkpoint holds no state_dict")
    state = {}
    for key, value in payload.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = key.removeprefix("module.")  # saved from DataParallel
        match = _DENSENET_LEGACY.match(key)
        state[match.group(1) + match.group(2) if match else key] = value
    return state


def fit_state(
    own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], *, stem: str
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """The tensors of a checkpoint's `state` that fit a one-channel network's `own` state
    by name and shape (cast to its dtypes), the keys adapted, and the keys skipped. An RGB
    `stem` kernel becomes one channel by summing over RGB: the response to a grey image
    repeated in three channels. Shared by every loader of user-provided weights."""
    usable: dict[str, torch.Tensor] = {}
    adapted: list[str] = []
    skipped: list[str] = []
    for key, value in state.items():
        if key == stem and value.ndim == 4 and value.shape[1] == 3:
            value = value.sum(dim=1, keepdim=True)
            adapted.append(key)
        if key in own and own[key].shape == value.shape:
            usable[key] = value.to(own[key].dtype)
        else:
            skipped.append(key)
    return usable, adapted, skipped


def init_from_torchvision(model: Encoder, path: str | os.PathLike[str]) -> InitReport:
    """Initialise the backbone from a user-provided torchvision checkpoint.

    E.g. `torchvision.models.resnet18` ImageNet weights a site downloaded elsewhere and
    copied in (or a Precedent encoder file, to continue training). Backbone keys whose
    names and shapes match are loaded (strict=False); the RGB stem becomes one channel
    by summing its kernels over RGB, which gives the response to a grey image repeated
    in three channels; the classifier is dropped. Fails when almost nothing matches,
    which means the checkpoint is of another architecture.
    """
    if not isinstance(model, Encoder):
        raise ValueError(f"{model.architecture} has no backbone to initialise")
    path = Path(path)
    state = _checkpoint_state(_read_checkpoint(path))
    own = model.backbone.state_dict()
    usable, adapted, skipped = fit_state(own, state, stem=f"{model.first_conv}.weight")
    if len(usable) < len(own) / 2:
        raise EncoderFileError(
            f"{path.name} does not fit {model.architecture}: only {len(usable)} of {len(own)} backbone tensors match"
        )
    result = model.backbone.load_state_dict(usable, strict=False)
    report = InitReport(sorted(usable), adapted, sorted(result.missing_keys), sorted(skipped))
    if report.missing:
        log.warning(
            "%s: %d backbone tensors left at random init: %s", path.name, len(report.missing), report.missing[:5]
        )
    return report


# --- running --------------------------------------------------------------------------


def pick_device(requested: str | None = None) -> torch.device:
    """The requested device, else CUDA when there is one, else the CPU."""
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {requested!r} requested but CUDA is not available")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads deliberately: `threads`, else $PRECEDENT_TORCH_THREADS,
    else the cores this process may run on (not the host's count, which in a container
    or under taskset oversubscribes and slows every op down)."""
    if threads is None:
        env = os.environ.get(THREADS_ENV, "").strip()
        threads = int(env) if env else len(os.sched_getaffinity(0))
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    return threads


def cpu_bf16_is_fast() -> bool:
    """True on CPUs with native bf16 matmul (AVX512-BF16 or AMX), where bf16 autocast
    paid here: ResNet-18 at 256² inference 25.8 img/s with bf16 + channels_last vs
    15.0 fp32 + channels_last (2 busy cores). Elsewhere bf16 is emulated and slower."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe and probe())


def _use_bf16(device: torch.device, bf16: bool | None) -> bool:
    if bf16 is not None:
        return bf16
    return device.type == "cuda" or (device.type == "cpu" and cpu_bf16_is_fast())


@torch.no_grad()
def embed_batch(
    model: BaseEncoder,
    tensors: Sequence[torch.Tensor] | torch.Tensor,
    device: torch.device | str | None = None,
    *,
    batch_size: int = 32,
    bf16: bool | None = None,
    pooling: str = "avg",
) -> np.ndarray:
    """Embed preprocessed images (each 1×S×S, or one N×1×S×S tensor) → float32 N×D,
    rows L2-normalised.

    `pooling` pools the feature maps: whole images take `pooling_for(prep)` (the
    encoder's `image_pooling`), regions "avg". One call, one size and one pooling.

    Eval mode, no autograd, channels_last, bf16 autocast where it is fast (`bf16=None`:
    on CUDA, and on CPUs with native bf16; the embeddings stay within cosine 0.99 of
    fp32, see the tests). The model is moved to `device` (default: `pick_device()`);
    its train/eval mode is restored afterwards.
    """
    device = torch.device(device) if device is not None else pick_device()
    count = len(tensors)
    if count == 0:
        return np.zeros((0, model.dim), dtype=np.float32)
    use_bf16 = _use_bf16(device, bf16)
    was_training = model.training
    model.to(device).eval()
    model.to(memory_format=torch.channels_last)
    out = np.empty((count, model.dim), dtype=np.float32)
    try:
        for start in range(0, count, batch_size):
            chunk = tensors[start : start + batch_size]
            batch = chunk if isinstance(chunk, torch.Tensor) else torch.stack(list(chunk))
            batch = batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                vectors = model(batch, pooling)
            out[start : start + len(batch)] = F.normalize(vectors.float(), dim=1).cpu().numpy()
    finally:
        model.train(was_training)
    return out
