"""What every dataset reader yields, and the DICOM-building helpers they share (no Django).

A reader turns a public dataset folder into `Item`s: DICOM Part 10 bytes (or the path
of a DICOM file that is already one) plus the ground truth for that image as
`FindingSpec`s. The importer feeds every item through the same ingest service as any
upload, so converted images are stored, deduplicated and rejected like real ones.

Converted files must come out byte-identical on every run: UIDs are derived from the
dataset and image names, dates are fixed, and the File Meta names this converter
rather than the pydicom version. A re-import then reads as "duplicate" instead of
creating copies or conflicting with the stored bytes.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

# Part of every generated UID. Bump it when the converters change the bytes they
# write: the new files then get new UIDs instead of clashing with stored ones.
CONVERTER_VERSION = "1"

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
DIGITAL_MAMMOGRAPHY_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"

# Finding.Pathology values; strings here because this package does not import Django.
NORMAL, BENIGN, MALIGNANT, UNKNOWN = "normal", "benign", "malignant", "unknown"


class DatasetError(Exception):
    """The dataset folder cannot be read at all (missing folder, CSV or column)."""


@dataclass(frozen=True)
class FindingSpec:
    """Ground truth for one image, as `services.finding_upsert` stores it.

    `box` is (x0, y0, x1, y1) in pixels of the image, top-left origin, x1/y1
    exclusive; None for image-level labels and for lesions without a location.
    `source_key` is unique within the image and stable across re-imports.
    """

    source_key: str
    pathology: str
    abnormality_class: str = ""
    box: tuple[float, float, float, float] | None = None
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Item:
    """One image of a dataset: its DICOM, its findings, or why it cannot be had."""

    name: str
    dicom: bytes | Path | None
    findings: list[FindingSpec] = field(default_factory=list)
    problem: str = ""


@dataclass
class Conversion:
    """A dataset opened for import. `items` is lazy: images are converted one at a time."""

    dataset: str
    description: str
    total: int
    items: Iterator[Item]
    notes: list[str] = field(default_factory=list)


def dataset_uid(*parts: object) -> str:
    """A '2.25.…' UID (PS3.5 B.2) that is the same every time for the same parts.

    Built from a name-based UUID (version 5): pydicom's generate_uid ignores its
    entropy sources when asked for a 2.25 UID and returns a random one.
    """
    name = "\x1f".join(["precedent-datasets", CONVERTER_VERSION, *map(str, parts)])
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


IMPLEMENTATION_CLASS_UID = dataset_uid("implementation")
IMPLEMENTATION_VERSION_NAME = f"PRECEDENT_DS{CONVERTER_VERSION}"


def find_root(path: Path, folder: str, marker: str) -> Path:
    """The dataset folder: `path` itself, or `path/folder` when given the datasets root.

    Raises DatasetError when neither holds `marker` (the CSV that must be there).
    """
    if not path.is_dir():
        raise DatasetError(f"{path} is not a folder")
    for candidate in (path, path / folder):
        if (candidate / marker).is_file():
            return candidate
    raise DatasetError(f"{marker} not found in {path} (nor in {path / folder})")


def read_csv(path: Path, required: Iterable[str]) -> list[dict[str, str]]:
    """Rows of a CSV as dicts of stripped strings; DatasetError when columns are missing."""
    if not path.is_file():
        raise DatasetError(f"{path} not found")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [name for name in required if name not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{path} lacks column(s) {', '.join(missing)}")
        return [{k: (v or "").strip() for k, v in row.items() if k} for row in reader]


def group_rows(rows: Iterable[dict[str, str]], column: str) -> defaultdict[str, list[dict[str, str]]]:
    """Rows keyed by one column's value (e.g. annotation lines by image); missing keys give []."""
    groups: defaultdict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        groups[row[column]].append(row)
    return groups


def clip_box(
    x0: float, y0: float, x1: float, y1: float, width: int, height: int
) -> tuple[float, float, float, float] | None:
    """The part of a box inside the image, or None when nothing of it is."""
    cx0, cy0 = max(0.0, x0), max(0.0, y0)
    cx1, cy1 = min(float(width), x1), min(float(height), y1)
    if cx1 <= cx0 or cy1 <= cy0:
        return None
    return (cx0, cy0, cx1, cy1)


def image_dataset(
    pixels: np.ndarray,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    study_instance_uid: str,
    series_instance_uid: str,
    bits_stored: int | None = None,
    **attributes: Any,
) -> Dataset:
    """A single-frame MONOCHROME2 image with File Meta, ready to encode.

    `pixels` is uint8 or uint16 (H × W); `attributes` are further DICOM keywords.
    """
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected a 2-D uint8 or uint16 array, got {pixels.dtype} {pixels.shape}")
    ds = _image_header(
        ExplicitVRLittleEndian,
        pixels.shape,
        bits_allocated=pixels.dtype.itemsize * 8,
        bits_stored=bits_stored,
        uids=(sop_class_uid, sop_instance_uid, study_instance_uid, series_instance_uid),
        attributes=attributes,
    )
    data = np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<")).tobytes()
    ds.PixelData = data + b"\0" * (len(data) % 2)
    return ds


def jpeg_image_dataset(
    jpeg: bytes,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    study_instance_uid: str,
    series_instance_uid: str,
    **attributes: Any,
) -> Dataset:
    """A single-frame image whose pixel data is `jpeg` itself, encapsulated unchanged.

    For sources that are lossy 8-bit greyscale baseline JPEGs: re-encoding would lose
    more, and raw pixels would take far more room (Mini-DDSM: 121 MB against 6.8 MB).
    The transfer syntax is JPEG Baseline (PS3.5 A.4.1); the image is marked lossy.
    Raises ValueError for anything but an 8-bit greyscale baseline JPEG.
    """
    try:
        with Image.open(io.BytesIO(jpeg)) as image:
            mode, (width, height), fmt = image.mode, image.size, image.format
            progressive = bool(image.info.get("progressive") or image.info.get("progression"))
    except OSError as exc:
        raise ValueError(f"not a readable JPEG: {exc}") from exc
    if fmt != "JPEG" or mode != "L" or progressive:
        raise ValueError(f"expected an 8-bit greyscale baseline JPEG, got {fmt} {mode}{' progressive' * progressive}")
    ds = _image_header(
        JPEGBaseline8Bit,
        (height, width),
        bits_allocated=8,
        bits_stored=8,
        uids=(sop_class_uid, sop_instance_uid, study_instance_uid, series_instance_uid),
        attributes=attributes,
    )
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def _image_header(
    transfer_syntax: str,
    shape: tuple[int, int],
    *,
    bits_allocated: int,
    bits_stored: int | None,
    uids: tuple[str, str, str, str],
    attributes: dict[str, Any],
) -> Dataset:
    """File Meta, UIDs, `attributes` and the MONOCHROME2 image pixel module, no pixel data."""
    sop_class_uid, sop_instance_uid, study_instance_uid, series_instance_uid = uids
    bits_stored = bits_stored or bits_allocated

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyInstanceUID = study_instance_uid
    ds.SeriesInstanceUID = series_instance_uid
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = shape
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    return ds


def encode(ds: Dataset) -> bytes:
    """Part 10 bytes: 128-byte preamble, 'DICM', File Meta, Explicit VR Little Endian body."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
