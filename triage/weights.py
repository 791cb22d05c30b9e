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
from embeddings.encoder import atomic_torch_save, state_digest

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
