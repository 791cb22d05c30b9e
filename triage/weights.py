"""Triage model weights files: one file holds the weights and everything needed to
rebuild and feed the network (architecture, classes, preprocessing), as the
encoders' files do (embeddings/encoder.py). No Django here.

Every triage kind (classifier, detector, segmenter) uses this one format; the pure
core of each kind exposes `build_from_meta(meta) -> nn.Module`, so a file can be
turned back into a model without knowing which module wrote it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

# One weights-file discipline for every model: the same atomic write and the same digest.
from embeddings.encoder import atomic_torch_save, fit_state, state_digest

FORMAT = "precedent-triage-model"
FORMAT_VERSION = 1
KINDS = ("classifier", "detector", "segmenter")


class ModelFileError(ValueError):
    """A triage weights file that cannot be used, with the reason in one line."""


@dataclass(frozen=True)
class ModelMeta:
    kind: str  # "classifier" | "detector" | "segmenter"
    architecture: str  # e.g. "resnet18", "fcos-resnet18", "unet-small"
    classes: tuple[str, ...]  # output classes / labels
    config: dict[str, Any]  # everything build_from_meta() needs
    preprocessing: dict[str, Any]  # input size, windowing ... travels with the weights
    training: dict[str, Any] = field(default_factory=dict)  # cohort, epochs, device, seconds, date
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ModelFileError(f"unknown model kind {self.kind!r}; known: {', '.join(KINDS)}")
        # A list from JSON or a caller is accepted; the frozen value is a tuple.
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["classes"] = list(self.classes)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelMeta:
        try:
            return cls(
                kind=str(data["kind"]),
                architecture=str(data["architecture"]),
                classes=tuple(data["classes"]),
                config=dict(data["config"]),
                preprocessing=dict(data["preprocessing"]),
                training=dict(data.get("training") or {}),
                metrics=dict(data.get("metrics") or {}),
            )
        except (KeyError, TypeError) as exc:
            raise ModelFileError(f"incomplete model metadata: {exc}") from None


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_model(path: str | os.PathLike[str], model: nn.Module, meta: ModelMeta) -> str:
    """Write weights and metadata to one file, atomically (temp file beside it, then
    rename, so a worker loading the active version never reads half a file).
    Returns the sha256 of the written file."""
    path = Path(path)
    state = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "meta": meta.to_dict(),
        "torch_version": str(torch.__version__),  # a TorchVersion, which weights_only loading refuses
        "torchvision_version": str(torchvision.__version__),
        "state_sha256": state_digest(state),
        "state_dict": state,
    }
    atomic_torch_save(path, payload)
    return file_sha256(path)


def load_model_file(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], ModelMeta]:
    """Read a file written by `save_model`: (state_dict on the CPU, metadata).

    Raises ModelFileError (one line) for a file that is missing, not a torch file,
    of another format or version, or damaged (weights checksum mismatch)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path.name}: no such weights file")
    try:
        # weights_only: a weights file from elsewhere must not be able to run code on load.
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        raise ModelFileError(f"{path.name} is not a readable torch weights file: {first[:200]}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"{path.name} is not a Precedent triage model file")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(f"{path.name} has triage model format {version}; this version reads {FORMAT_VERSION}")
    state = payload.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(f"{path.name} holds no state_dict")
    if state_digest(state) != payload.get("state_sha256"):
        raise ModelFileError(f"{path.name}: weights checksum mismatch, the file is damaged")
    meta = ModelMeta.from_dict(payload.get("meta") or {})
    return state, meta


# --- starting a trunk from other weights (transfer learning) ------------------------------


@dataclass(frozen=True)
class InitReport:
    source: str
    loaded: int  # trunk tensors taken from the checkpoint
    adapted: int  # of those, RGB stems summed to one channel
    total: int  # tensors of the trunk


# Where the ResNet trunk sits in Precedent's own files: a detector's FCOS keeps it under
# its FPN backbone, the classifier and the search encoders directly.
_TRUNK_PREFIXES = ("backbone.body.", "backbone.")


def init_trunk(trunk: nn.Module, path: str | os.PathLike[str], *, architecture: str) -> InitReport:
    """Start a one-channel ResNet trunk (the classifier's backbone, or the body under a
    detector's FPN) from a checkpoint: a Precedent search-encoder file, a triage
    classifier or detector file, or a torchvision state_dict (e.g. ImageNet weights a
    site copied in; nothing is downloaded).

    Keys whose names and shapes match are loaded; an RGB stem becomes one channel by
    summing its kernels (the response to a grey image repeated in three channels).
    Raises ModelFileError when fewer than half the trunk's tensors match (another
    architecture)."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelFileError(f"{path.name}: no such weights file") from None
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelFileError(f"{path.name} is not a readable torch weights file: {first[:200]}") from None
    if isinstance(payload, dict) and payload.get("format") in (FORMAT, "precedent-encoder"):
        full = payload.get("state_dict") or {}
        state = {}
        for prefix in _TRUNK_PREFIXES:
            state = {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}
            if state:
                break
    else:
        for key in ("state_dict", "model"):
            if isinstance(payload, dict) and isinstance(payload.get(key), dict):
                payload = payload[key]
        if not isinstance(payload, dict):
            raise ModelFileError(f"{path.name} holds no state_dict")
        state = {k.removeprefix("module."): v for k, v in payload.items() if isinstance(v, torch.Tensor)}
    own = trunk.state_dict()
    usable, adapted, _ = fit_state(own, state, stem="conv1.weight")
    candidates = [k for k in state if not k.startswith(("fc.", "classifier.", "head."))]
    # Both ways: a checkpoint of a deeper net shares many names and shapes (stem, first
    # blocks) with a shallower one, yet most of its tensors have nowhere to go.
    if len(usable) < len(own) / 2 or len(usable) < len(candidates) / 2:
        raise ModelFileError(
            f"{path.name} does not fit {architecture}: only {len(usable)} of {len(own)} trunk tensors match"
        )
    trunk.load_state_dict(usable, strict=False)
    return InitReport(source=path.name, loaded=len(usable), adapted=len(adapted), total=len(own))
