"""Pure pydicom: read and validate a DICOM file, decode its pixels, window them.

No Django here. `read_header` turns a Part 10 file into a `DicomHeader` (or raises an
`IngestError` with a one-line reason); `decode_frame` gives one frame as modality
values; `render` applies the VOI (window, VOI LUT, presets) and returns 8-bit pixels
ready for PNG.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder, pixel_array
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pydicom.valuerep import DA, TM

from .errors import InvalidDicom, NotDicom, PixelDataError, RenderError, UnsupportedTransferSyntax

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# PS3.3 C.7.6.3.1.2, retired values included: anything else cannot be rendered.
PHOTOMETRIC_INTERPRETATIONS = frozenset(
    {
        "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422",
        "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "XYB", "HSV", "ARGB", "CMYK",
    }
)  # fmt: skip
_PIXEL_TAGS = frozenset(pydicom.datadict.tag_for_keyword(keyword) for keyword in PIXEL_KEYWORDS)
# Leading zeros in UID components are common in the wild and harmless for us; the
# characters and length are what keep URLs and database keys safe.
_UID_LOOSE_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")

# pydicom reports structural trouble (a file that ends inside an element, say) as a
# warning plus a log record. Warnings are process-global and not thread-safe to catch,
# so collect the log records per thread instead, and keep the warnings quiet.
warnings.filterwarnings("ignore", module=r"pydicom(\..*)?$")
# Reading-time value validation only warns (and costs a third of header parsing); the
# values we rely on are checked here, strictly (UIDs, pixel-module integers).
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
_read_notes = threading.local()


class _CollectPydicomWarnings(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        notes = getattr(_read_notes, "messages", None)
        if notes is not None:
            notes.append(record.getMessage())


log = logging.getLogger(__name__)
_pydicom_log = logging.getLogger("pydicom")
_pydicom_log.addHandler(_CollectPydicomWarnings(level=logging.WARNING))
_pydicom_log.propagate = False

_TRUNCATION_MARKERS = ("End of file reached", "truncated", "premature end")


@dataclass(frozen=True)
class DicomHeader:
    """What the platform keeps of a DICOM header: patient, study, series, instance."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str = ""
    patient_sex: str = ""
    patient_birth_date: dt.date | None = None
    accession_number: str = ""
    study_id: str = ""
    study_date: dt.date | None = None
    study_time: dt.time | None = None
    study_description: str = ""
    referring_physician: str = ""
    institution_name: str = ""
    modality: str = ""
    series_number: int | None = None
    series_description: str = ""
    body_part: str = ""
    laterality: str = ""
    view_position: str = ""
    manufacturer: str = ""
    manufacturer_model: str = ""
    instance_number: int | None = None
    rows: int | None = None
    columns: int | None = None
    number_of_frames: int = 1
    samples_per_pixel: int | None = None
    bits_allocated: int | None = None
    bits_stored: int | None = None
    photometric_interpretation: str = ""
    has_pixel_data: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def transfer_syntax_name(self) -> str:
        return UID(self.transfer_syntax_uid).name


# --- reading and validating ----------------------------------------------------------


def read_dataset(path: Path | str, *, stop_before_pixels: bool = False) -> Dataset:
    """Read a Part 10 file strictly (preamble and File Meta required)."""
    return pydicom.dcmread(str(path), stop_before_pixels=stop_before_pixels, defer_size="256 KB")


def read_header(
    path: Path | str, *, verify_pixels: bool = True, require_uids: bool = True
) -> tuple[Dataset, DicomHeader]:
    """Parse and validate one DICOM Part 10 file.

    Raises an `IngestError` subclass with a one-line reason when the file cannot be
    stored: not DICOM, truncated, missing or malformed UIDs, a DICOMDIR, an
    unsupported transfer syntax, or pixel data that is short or undecodable.
    With `verify_pixels`, compressed pixel data is proven decodable by decoding the
    first frame; uncompressed pixel data is checked by length, which costs nothing.
    `require_uids=False` reads a file that will not be stored (a search query): its
    missing or malformed UIDs are left empty instead of refused.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise NotDicom("empty file (0 bytes)")

    _read_notes.messages = []
    try:
        ds = read_dataset(path)
    except InvalidDicomError:
        raise NotDicom(_explain_not_dicom(path)) from None
    except (EOFError, OSError) as exc:
        raise InvalidDicom(f"file is truncated: {exc}") from None
    except Exception as exc:  # pydicom raises many kinds on malformed input
        raise InvalidDicom(f"unreadable DICOM: {type(exc).__name__}: {exc}") from None
    finally:
        notes, _read_notes.messages = _read_notes.messages, None

    for note in notes:
        if any(marker in note for marker in _TRUNCATION_MARKERS):
            # pydicom names the (temporary) file; the sender knows which file it sent.
            raise InvalidDicom(f"file is truncated: {re.sub(r' in file .*$', '', note)}")

    meta = ds.file_meta
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:  # offsets are in the inflated stream
        cut = _cut_short(ds, path, size)
        if cut:
            raise InvalidDicom(f"file is truncated: {cut}")
    if meta.get("MediaStorageSOPClassUID") == DICOMDIR_SOP_CLASS:
        raise InvalidDicom(
            "this is a DICOMDIR (media directory), not an instance: ingest its folder, or the files it references"
        )
    transfer_syntax = meta.get("TransferSyntaxUID")
    if not transfer_syntax:
        raise InvalidDicom("File Meta Information lacks TransferSyntaxUID (0002,0010)")

    uids = {}
    for keyword, tag in (
        ("SOPClassUID", "(0008,0016)"),
        ("SOPInstanceUID", "(0008,0018)"),
        ("StudyInstanceUID", "(0020,000D)"),
        ("SeriesInstanceUID", "(0020,000E)"),
    ):
        value = _text(ds, keyword, 200)
        if not require_uids and (not value or len(value) > 64 or not _UID_LOOSE_RE.match(value)):
            uids[keyword] = ""  # a query's UIDs identify nothing: missing or malformed, they are left out
            continue
        if not value:
            raise InvalidDicom(f"missing {keyword} {tag}")
        if len(value) > 64 or not _UID_LOOSE_RE.match(value):
            raise InvalidDicom(f"{keyword} {tag} is not a valid DICOM UID: {value[:70]!r}")
        uids[keyword] = value

    has_pixels = any(keyword in ds for keyword in PIXEL_KEYWORDS)
    header = DicomHeader(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        transfer_syntax_uid=str(transfer_syntax),
        patient_id=_text(ds, "PatientID", 64),
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID", 64),
        patient_name=_text(ds, "PatientName", 320),
        patient_sex=_text(ds, "PatientSex", 16),
        patient_birth_date=_date(ds, "PatientBirthDate"),
        accession_number=_text(ds, "AccessionNumber", 64),
        study_id=_text(ds, "StudyID", 64),
        study_date=_date(ds, "StudyDate"),
        study_time=_time(ds, "StudyTime"),
        study_description=_text(ds, "StudyDescription", 255),
        referring_physician=_text(ds, "ReferringPhysicianName", 320),
        institution_name=_text(ds, "InstitutionName", 255),
        modality=_text(ds, "Modality", 16).upper(),
        series_number=_int(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription", 255),
        body_part=_text(ds, "BodyPartExamined", 64).upper(),
        laterality=(_text(ds, "ImageLaterality", 16) or _text(ds, "Laterality", 16)).upper(),
        view_position=_view_position(ds),
        manufacturer=_text(ds, "Manufacturer", 255),
        manufacturer_model=_text(ds, "ManufacturerModelName", 255),
        instance_number=_int(ds, "InstanceNumber"),
        has_pixel_data=has_pixels,
        **(_pixel_module(ds, str(transfer_syntax), path, verify_pixels) if has_pixels else {}),
    )
    return ds, header


def _cut_short(ds: Dataset, path: Path, size: int) -> str:
    """Why a file that pydicom read without complaint was cut short, or "".

    pydicom reads a last element whose value runs past the end of the file, and stops
    quietly when the file ends inside an element's header: a cut file then reads as a
    shorter, valid-looking one (a CT slice without its pixel data, a UID missing its
    last digits). Only the last element read can be cut, and in a whole file it ends
    where the file ends. (One look, not a walk: this runs on every stored file.)
    """
    if not len(ds):
        return ""
    elem = next(reversed(ds.values()))  # read order: the last element in the file
    tell, length = getattr(elem, "value_tell", None), getattr(elem, "length", None)
    if tell is None or length is None or length == 0xFFFFFFFF or elem.tag in _PIXEL_TAGS:
        # Converted as it was read (no offsets), or of undefined length (its items were
        # read to their delimiter); pixel data has checks of its own that say more
        # (`_pixel_module`: its length, or whether it decodes).
        return ""
    if tell + length > size:
        return f"element {elem.tag} needs {length} bytes at offset {tell}, but the file ends at {size}"
    if tell + length < size:
        with path.open("rb") as fh:  # a few bytes of NUL padding after the data set are harmless
            fh.seek(tell + length)
            if not fh.read(8).strip(b"\0"):
                return ""
        return f"the file ends inside an element header ({size - tell - length} bytes after the last whole element)"
    return ""


def _explain_not_dicom(path: Path) -> str:
    with path.open("rb") as fh:
        head = fh.read(132)
    if head[128:132] != b"DICM":
        return "not a DICOM Part 10 file: no 128-byte preamble followed by 'DICM'"
    return "not a DICOM Part 10 file: the File Meta Information cannot be read"


# The most values one frame may declare (rows × columns × samples): 2**26, e.g. 8192 ×
# 8192 grey. Radiographs and mammograms stay under 2**25. Without a cap, a few megabytes
# of compressed data can declare a frame that takes gigabytes to decode and draw.
MAX_FRAME_PIXELS = 2**26


def _pixel_module(ds: Dataset, transfer_syntax: str, path: Path, verify: bool) -> dict[str, Any]:
    """Validate the Image Pixel module and return its values for the header."""
    values: dict[str, Any] = {}
    for keyword, tag in (
        ("Rows", "(0028,0010)"),
        ("Columns", "(0028,0011)"),
        ("BitsAllocated", "(0028,0100)"),
        ("SamplesPerPixel", "(0028,0002)"),
    ):
        value = _int(ds, keyword, strict_tag=tag)
        if value is None or value <= 0:
            raise PixelDataError(f"pixel data without a valid {keyword} {tag}")
        values[keyword] = value
    frames = _int(ds, "NumberOfFrames", strict_tag="(0028,0008)")
    if frames is not None and frames <= 0:
        raise PixelDataError(f"NumberOfFrames (0028,0008) must be positive, got {frames}")
    pixels = values["Rows"] * values["Columns"] * values["SamplesPerPixel"]
    if pixels > MAX_FRAME_PIXELS:
        raise PixelDataError(
            f"a frame of {values['Rows']}×{values['Columns']}×{values['SamplesPerPixel']} values is over the "
            f"{MAX_FRAME_PIXELS:,} a frame may hold here"
        )
    bits = values["BitsAllocated"]
    if bits != 1 and bits % 8:
        raise PixelDataError(f"BitsAllocated (0028,0100) must be 1 or a multiple of 8, got {bits}")
    bits_stored = _int(ds, "BitsStored", strict_tag="(0028,0101)")
    if bits_stored is not None and not 1 <= bits_stored <= bits:
        raise PixelDataError(f"BitsStored (0028,0101) must be between 1 and BitsAllocated ({bits}), got {bits_stored}")
    photometric = _text(ds, "PhotometricInterpretation", 32).upper()
    if not photometric:
        raise PixelDataError("pixel data without PhotometricInterpretation (0028,0004)")
    if photometric not in PHOTOMETRIC_INTERPRETATIONS:
        raise PixelDataError(f"PhotometricInterpretation (0028,0004) {photometric[:32]!r} is not one DICOM defines")
    for keyword, tag in (("RescaleSlope", "(0028,1053)"), ("RescaleIntercept", "(0028,1052)")):
        text = _text(ds, keyword, 64)
        try:
            if text:
                float(text.split("\\")[0])
        except ValueError:
            raise PixelDataError(f"{keyword} {tag} is not a number: {text[:32]!r}") from None

    ts = UID(transfer_syntax)
    if "PixelData" in ds:
        try:
            decoder = get_decoder(ts)
        except NotImplementedError:
            decoder = None
        if decoder is None or not decoder.is_available:
            raise UnsupportedTransferSyntax(f"unsupported transfer syntax {ts} ({ts.name}): no pixel decoder installed")
        if ts.is_encapsulated:
            if verify:
                _verify_decodes(path, ts)
        else:
            expected = get_expected_length(ds, "bytes")
            actual = _stored_length(ds, "PixelData", path.stat().st_size)
            if actual < expected:
                raise PixelDataError(
                    f"Pixel Data is {actual} bytes, but Rows×Columns×Frames×Samples×BitsAllocated needs {expected}"
                )

    return {
        "rows": values["Rows"],
        "columns": values["Columns"],
        "number_of_frames": frames or 1,
        "samples_per_pixel": values["SamplesPerPixel"],
        "bits_allocated": values["BitsAllocated"],
        "bits_stored": bits_stored or bits,
        "photometric_interpretation": photometric,
    }


def _stored_length(ds: Dataset, keyword: str, file_size: int) -> int:
    """Bytes of an element's value actually in the file, without reading a deferred
    value from disk: the declared length, cut short where the file ends early."""
    element = ds.get_item(keyword)
    length, offset = getattr(element, "length", None), getattr(element, "value_tell", None)
    if length is None or offset is None or length == 0xFFFFFFFF:
        return len(ds[keyword].value or b"")
    return max(0, min(length, file_size - offset))


def _frame_array(path: Path | str, index: int | None) -> np.ndarray:
    """Decode one frame straight from the file, reading only that frame's bytes.

    That reader trusts the File Meta transfer syntax and cannot inflate Deflate; files
    whose body disagrees with their meta (pydicom copes when it reads the whole
    dataset) and deflated files take the slower whole-dataset path.
    """
    try:
        return pixel_array(str(path), index=index)
    except Exception:
        return pixel_array(pydicom.dcmread(str(path)), index=index)


def _verify_decodes(path: Path, ts: UID) -> None:
    try:
        _frame_array(path, 0)
    except Exception as exc:
        raise PixelDataError(f"pixel data cannot be decoded ({ts.name}): {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # pydicom lists one line per plugin; the first names the common cause, the rest repeat it.
    text = "; ".join(lines[:3]) or type(exc).__name__
    return text[:300]


# --- safe header access --------------------------------------------------------------


def _raw(ds: Dataset, keyword: str) -> Any:
    try:
        return ds.get(keyword)
    except Exception:
        return None


def _text(ds: Dataset, keyword: str, limit: int) -> str:
    value = _raw(ds, keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = "\\".join(str(v) for v in value)
    # PostgreSQL text cannot hold NUL; DICOM pads with NUL and spaces.
    return str(value).replace("\x00", "").strip()[:limit]


def _int(ds: Dataset, keyword: str, strict_tag: str | None = None) -> int | None:
    value = _raw(ds, keyword)
    if value is None or value == "":
        if strict_tag and keyword in ds:
            raw = ds.get_item(keyword)
            raw_value = getattr(raw, "value", b"")
            if raw_value not in (None, b"", ""):
                text = raw_value.decode("ascii", "replace") if isinstance(raw_value, bytes) else str(raw_value)
                raise InvalidDicom(f"{keyword} {strict_tag} is not a valid integer: {text.strip()!r}")
        return None
    if isinstance(value, pydicom.multival.MultiValue):
        value = value[0] if value else None
    try:
        number = int(value)
    except (TypeError, ValueError):
        if strict_tag:
            raise InvalidDicom(f"{keyword} {strict_tag} is not a valid integer: {str(value)!r}") from None
        return None
    if not -(2**31) <= number < 2**31:  # outside what IS (and a PostgreSQL integer) can hold
        if strict_tag:
            raise InvalidDicom(f"{keyword} {strict_tag} is out of range: {number}")
        return None
    return number


def _date(ds: Dataset, keyword: str) -> dt.date | None:
    text = _text(ds, keyword, 32)
    if not text:
        return None
    try:
        return DA(text)
    except ValueError:
        return None


def _time(ds: Dataset, keyword: str) -> dt.time | None:
    text = _text(ds, keyword, 32)
    if not text:
        return None
    if ":" in text:  # ACR-NEMA style HH:MM:SS, still written by old modalities
        text = text.replace(":", "")
    try:
        value = TM(text)
        return dt.time(value.hour, value.minute, value.second, value.microsecond)
    except (ValueError, AttributeError):
        return None


def _view_position(ds: Dataset) -> str:
    view = _text(ds, "ViewPosition", 16).upper()
    if view:
        return view
    # Mammography often codes the view only in ViewCodeSequence (CID 4014).
    seq = _raw(ds, "ViewCodeSequence")
    if seq:
        meaning = _text(seq[0], "CodeMeaning", 64).lower()
        for needle, code in (("medio-lateral oblique", "MLO"), ("cranio-caudal", "CC"), ("medio-lateral", "ML")):
            if needle in meaning:
                return code
    return ""


# --- pixels ---------------------------------------------------------------------------


# What an enhanced multi-frame object (enhanced CT/MR, breast tomosynthesis) keeps in
# its functional groups instead of the top level: the rescale and the window.
_FRAME_GROUPS = {
    "PixelValueTransformationSequence": ("RescaleIntercept", "RescaleSlope", "RescaleType"),
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction", "WindowCenterWidthExplanation"),
}


def frame_header(ds: Dataset, frame: int = 1) -> Dataset:
    """The header as it applies to one frame (1-based).

    Enhanced multi-frame objects keep the rescale and the window in the per-frame
    functional group of each frame, or in the shared group for all of them
    (PS3.3 C.7.6.16), not at the top level where `apply_modality_lut` and
    `file_window` look. For such an object this returns a copy with the frame's
    values lifted to the top level; any other header comes back as it is.
    """
    per_frame = _raw(ds, "PerFrameFunctionalGroupsSequence")
    shared = _raw(ds, "SharedFunctionalGroupsSequence")
    if not per_frame and not shared:
        return ds
    lifted: dict[str, Any] = {}
    for sequence, keywords in _FRAME_GROUPS.items():
        for groups in (per_frame[frame - 1 : frame] if per_frame else [], shared[:1] if shared else []):
            item = next(iter(_raw(groups[0], sequence) or []), None) if groups else None
            if item is not None:
                lifted.update({k: item[k].value for k in keywords if k in item and k not in lifted})
                break
    if not lifted:
        return ds
    out = Dataset()
    out.update({elem.tag: elem for elem in ds})
    for keyword, value in lifted.items():
        setattr(out, keyword, value)
    return out


def decode_frame(path: Path | str, ds: Dataset, frame: int = 1) -> np.ndarray:
    """One frame (1-based) as float32 modality values, or as uint8 RGB for colour images.

    `ds` is the header (read with `stop_before_pixels`): it carries the LUTs. Render
    with `frame_header(ds, frame)`, which holds that frame's window.
    """
    frames = _int(ds, "NumberOfFrames") or 1
    if not 1 <= frame <= frames:
        raise RenderError(f"frame {frame} is out of range 1..{frames}")
    values = (_int(ds, "Rows") or 0) * (_int(ds, "Columns") or 0) * (_int(ds, "SamplesPerPixel") or 1)
    if values > MAX_FRAME_PIXELS:  # stored before ingest refused such frames
        raise RenderError(f"a frame of {values:,} values is over the {MAX_FRAME_PIXELS:,} a frame may hold here")
    ds = frame_header(ds, frame)
    try:
        arr = _frame_array(path, frame - 1 if frames > 1 else None)
        photometric = _text(ds, "PhotometricInterpretation", 32).upper()
        if photometric == "PALETTE COLOR":
            return _to_uint8_rgb(apply_color_lut(arr, ds), _palette_bits(ds))
        if arr.ndim == 3 and arr.shape[-1] in (3, 4):
            # pydicom already converted YBR to RGB.
            return _to_uint8_rgb(arr[..., :3], _int(ds, "BitsStored") or 8)
        return apply_modality_lut(arr, ds).astype(np.float32, copy=False)
    except Exception as exc:  # a decoder or a malformed LUT: the image cannot be shown
        raise RenderError(f"pixel data cannot be decoded: {_first_line(exc)}") from None


def _palette_bits(ds: Dataset) -> int:
    descriptor = _raw(ds, "RedPaletteColorLookupTableDescriptor")
    try:
        return int(descriptor[2])
    except (TypeError, IndexError, ValueError):
        return 16


def _to_uint8_rgb(arr: np.ndarray, bits: int) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    top = float(2**bits - 1) if bits > 8 else 255.0
    return np.clip(arr.astype(np.float32) * (255.0 / top), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Window:
    center: float
    width: float
    function: str = "LINEAR"


# Window presets (centre, width) a radiologist expects to find by name.
PRESETS: dict[str, Window | str] = {
    "default": "default",  # what the file says (VOI LUT or first window), else auto
    "auto": "auto",  # 0.5–99.5 percentile of the image
    "full": "full",  # the whole range of stored values
    "brain": Window(40, 80),
    "subdural": Window(75, 215),
    "stroke": Window(40, 40),
    "lung": Window(-600, 1500),
    "mediastinum": Window(50, 350),
    "abdomen": Window(40, 400),
    "liver": Window(80, 150),
    "bone": Window(400, 1800),
}
PRESETS_BY_MODALITY: dict[str, list[str]] = {
    "CT": ["default", "brain", "subdural", "stroke", "lung", "mediastinum", "abdomen", "liver", "bone", "auto", "full"],
    "MG": ["default", "auto", "full"],
}
GENERIC_PRESETS = ["default", "auto", "full"]


def presets_for(modality: str) -> list[str]:
    return PRESETS_BY_MODALITY.get(modality.upper(), GENERIC_PRESETS)


def apply_window(values: np.ndarray, window: Window) -> np.ndarray:
    """Map modality values to 0..1 through a VOI window (PS3.3 C.11.2.1.2)."""
    c, w = float(window.center), float(window.width)
    function = window.function.upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - c) / max(w, 1e-6)))
    if function == "LINEAR_EXACT":
        return np.clip((values - c) / max(w, 1e-6) + 0.5, 0.0, 1.0)
    w = max(w, 1.0)
    if w == 1.0:
        return (values > c - 0.5).astype(np.float32)
    return np.clip((values - (c - 0.5)) / (w - 1.0) + 0.5, 0.0, 1.0)


def auto_window(values: np.ndarray, low: float = 0.5, high: float = 99.5) -> Window:
    sample = values[:: max(1, values.shape[0] // 512), :: max(1, values.shape[1] // 512)]
    lo, hi = np.percentile(sample, [low, high])
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    return Window(center=(lo + hi) / 2.0, width=max(hi - lo, 1.0) + 1.0)


def file_window(ds: Dataset) -> Window | None:
    center, width = _raw(ds, "WindowCenter"), _raw(ds, "WindowWidth")
    if center is None or width is None:
        return None
    try:
        c = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        w = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
    except (TypeError, ValueError, IndexError):
        return None
    if w <= 0:
        return None
    return Window(c, w, _text(ds, "VOILUTFunction", 16) or "LINEAR")


@dataclass(frozen=True)
class Rendered:
    """A display image and the window that made it (None for colour and VOI LUTs)."""

    image: np.ndarray
    window: Window | None


# Bump when `render` draws the same request differently: cached renderings are keyed by it.
RENDER_VERSION = 2  # 2: enhanced multi-frame objects use their frames' rescale and window


def render(
    pixels: np.ndarray,
    ds: Dataset,
    *,
    window: Window | None = None,
    preset: str = "default",
    max_size: int | None = None,
) -> Rendered:
    """Decoded frame → uint8 display image (grey H×W or RGB H×W×3).

    Grey images go through the VOI stage: an explicit `window` wins; otherwise the
    `preset` ("default" uses the file's VOI LUT or window, falling back to "auto").
    MONOCHROME1 is inverted so that more attenuation is always brighter.
    """
    if pixels.ndim == 3:  # colour: no VOI stage
        return Rendered(_resize(pixels, max_size), None)
    if window is None:
        choice = PRESETS.get(preset)
        if choice is None:
            raise RenderError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        if isinstance(choice, Window):
            window = choice
        elif choice == "full":
            lo, hi = float(pixels.min()), float(pixels.max())
            window = Window((lo + hi) / 2.0, max(hi - lo, 1.0) + 1.0)
        elif choice == "default" and "VOILUTSequence" in ds:
            return Rendered(_finish(_voi_lut(pixels, ds), ds, max_size), None)
        elif choice == "default":
            window = file_window(ds) or auto_window(pixels)
        else:
            window = auto_window(pixels)
    return Rendered(_finish(apply_window(pixels, window), ds, max_size), window)


def _voi_lut(values: np.ndarray, ds: Dataset) -> np.ndarray:
    item = ds.VOILUTSequence[0]
    # LUT entries are indexed by integer modality values; float input only draws a warning.
    mapped = apply_voi_lut(np.rint(values).astype(np.int32), ds, index=0, prefer_lut=True).astype(np.float32)
    lut = np.asarray(item.LUTData, dtype=np.float32)
    lo, hi = float(lut.min()), float(lut.max())
    return np.clip((mapped - lo) / max(hi - lo, 1.0), 0.0, 1.0)


def _finish(unit: np.ndarray, ds: Dataset, max_size: int | None) -> np.ndarray:
    if _text(ds, "PhotometricInterpretation", 32).upper() == "MONOCHROME1":
        unit = 1.0 - unit
    return _resize((unit * 255.0 + 0.5).astype(np.uint8), max_size)


def _resize(image: np.ndarray, max_size: int | None) -> np.ndarray:
    if not max_size or max(image.shape[:2]) <= max_size:
        return image
    from PIL import Image

    pil = Image.fromarray(image)
    pil.thumbnail((max_size, max_size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(pil)


_WINDOW_KEY = "precedent:window"


def encode_png(rendered: Rendered) -> bytes:
    """Rendered image → PNG bytes, the applied window kept in a text chunk.

    Fast compression: previews are cached, and level 1 is several times quicker than
    the default on a 4736×2624 mammogram for a file about 15 % larger.
    """
    import io

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if rendered.window is not None:
        w = rendered.window
        info.add_text(_WINDOW_KEY, f"{w.center:.6g} {w.width:.6g} {w.function}")
    buffer = io.BytesIO()
    Image.fromarray(rendered.image).save(buffer, format="PNG", compress_level=1, pnginfo=info)
    return buffer.getvalue()


def png_window(path: Path | str) -> Window | None:
    """The window a cached PNG was rendered with (read from its header, not its pixels)."""
    from PIL import Image

    with Image.open(path) as image:
        text = image.text.get(_WINDOW_KEY) if hasattr(image, "text") else None
    if not text:
        return None
    center, width, function = text.split()
    return Window(float(center), float(width), function)


# --- DICOMDIR --------------------------------------------------------------------------


def is_dicomdir_name(path: Path) -> bool:
    return path.name.upper() == "DICOMDIR"


def is_dicomdir(path: Path) -> bool:
    """Named DICOMDIR (as PS3.10 requires on media), or any Part 10 file whose File
    Meta says Media Storage Directory (copies named DICOMDIR-old and the like)."""
    if is_dicomdir_name(path):
        return True
    try:
        with path.open("rb") as fh:
            if fh.read(132)[128:132] != b"DICM":
                return False
        meta = pydicom.filereader.read_file_meta_info(str(path))
    except Exception:  # unreadable: ingest says why
        return False
    return meta.get("MediaStorageSOPClassUID") == DICOMDIR_SOP_CLASS


def dicomdir_files(path: Path | str) -> list[Path]:
    """The files a DICOMDIR references, in its order (missing ones included: the
    caller reports them). Raises InvalidDicom when the DICOMDIR cannot be read."""
    from pydicom.fileset import FileSet

    try:
        ds = pydicom.dcmread(str(path))
    except Exception as exc:
        raise InvalidDicom(f"cannot read DICOMDIR: {_first_line(exc)}") from None
    try:
        referenced = [Path(record.path) for record in FileSet(ds)]
    except Exception as exc:
        # The record tree is malformed (e.g. an image record with no patient record
        # above it): the files are still named in the records, in the same order.
        referenced = _referenced_files(ds, Path(path).parent)
        if not referenced:
            raise InvalidDicom(f"cannot read DICOMDIR: {_first_line(exc)}") from None
        log.warning("%s: %s; reading its records one by one", path, _first_line(exc))
    # A file-set's files are under its root: a record naming "../.." would make an
    # operator's ingest read any file on the host.
    root = Path(path).resolve().parent
    for file in referenced:
        if not file.resolve().is_relative_to(root):
            raise InvalidDicom(f"DICOMDIR references a file outside its folder: {file}")
    return referenced


def _referenced_files(ds: Dataset, root: Path) -> list[Path]:
    """Every ReferencedFileID in a DICOMDIR's records, as paths under `root`."""
    out = []
    for record in _raw(ds, "DirectoryRecordSequence") or []:
        parts = _raw(record, "ReferencedFileID")
        if not parts:
            continue
        parts = [parts] if isinstance(parts, str) else list(parts)
        out.append(root.joinpath(*(str(part).strip() for part in parts)))
    return out
