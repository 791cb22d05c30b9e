"""DICOMweb wire formats without Django (PS3.18): media types, multipart/related, the
DICOM JSON model, QIDO-RS query parsing, WADO-RS frames and metadata, STOW-RS answers.

Everything here takes bytes, streams, paths, pydicom datasets and plain values, so the
formats are tested fast and directly; services.py, selectors.py and views.py only wire
requests to these functions and rows to these dictionaries.
"""

from __future__ import annotations

import datetime as dt
import enum
import io
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian

from studies.dicom import Window

# --- media types -------------------------------------------------------------------------

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTET_STREAM = "application/octet-stream"
MULTIPART_RELATED = "multipart/related"

# The media type of one compressed frame per transfer syntax (PS3.18 Table 8.7.3-2).
FRAME_MEDIA_TYPES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}
# Older names clients still send for the same formats.
_MEDIA_TYPE_ALIASES = {"image/x-dicom-rle": "image/dicom-rle", "image/x-jls": "image/jls"}

_RANGE_RE = re.compile(r"\s*([^;,\s]+)\s*")
_PARAM_RE = re.compile(r';\s*([^=;,\s]+)\s*(?:=\s*(?:"((?:[^"\\]|\\.)*)"|([^;,\s]*)))?\s*')


class NotAcceptable(Exception):
    """No representation the request's Accept allows can be produced (HTTP 406)."""


class UnsupportedMediaType(Exception):
    """A request body in a media type this service does not take (HTTP 415)."""


@dataclass(frozen=True)
class MediaRange:
    """One entry of an Accept header, or one Content-Type: `type/subtype; params`."""

    media_type: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    @property
    def related_type(self) -> str:
        """The `type` parameter of multipart/related ("" when absent)."""
        return _MEDIA_TYPE_ALIASES.get(self.params.get("type", "").lower(), self.params.get("type", "").lower())

    @property
    def transfer_syntax(self) -> str:
        return self.params.get("transfer-syntax", "")

    def covers(self, media_type: str) -> bool:
        """Whether this range admits `media_type` (wildcards `*/*` and `type/*`)."""
        if self.media_type in ("*/*", "*"):
            return True
        if self.media_type.endswith("/*"):
            return media_type.startswith(self.media_type[:-1])
        return self.media_type == media_type


def parse_media_type(value: str) -> MediaRange:
    """`multipart/related; type="application/dicom"; boundary=x` → MediaRange.

    Parameter names are lower-cased and quoted values unquoted; the media type is
    lower-cased (values such as the boundary keep their case).
    """
    ranges = _parse_ranges(value, single=True)
    return ranges[0] if ranges else MediaRange("")


def parse_accept(header: str | None) -> list[MediaRange]:
    """An Accept header as media ranges, most preferred first; none means `*/*`.

    Ranges with q=0 are dropped (the client refuses them); equal q keeps the order
    the client wrote, which is how most clients rank their choices.
    """
    if not header or not header.strip():
        return [MediaRange("*/*")]
    ranges = [r for r in _parse_ranges(header, single=False) if r.q > 0]
    return sorted(ranges, key=lambda r: -r.q)


def _parse_ranges(text: str, *, single: bool) -> list[MediaRange]:
    ranges: list[MediaRange] = []
    pos = 0
    while pos < len(text):
        match = _RANGE_RE.match(text, pos)
        if not match:
            break
        media_type = match.group(1).lower()
        pos = match.end()
        params: dict[str, str] = {}
        q = 1.0
        while pos < len(text) and text[pos] == ";":
            param = _PARAM_RE.match(text, pos)
            if not param:
                pos += 1
                continue
            name = param.group(1).lower()
            raw = param.group(2) if param.group(2) is not None else (param.group(3) or "")
            value = re.sub(r"\\(.)", r"\1", raw) if param.group(2) is not None else raw
            pos = param.end()
            if name == "q" and not single:
                try:
                    q = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    q = 0.0
            else:
                params[name] = value
        ranges.append(MediaRange(media_type, params, q))
        if single:
            break
        # Skip to the next comma-separated range.
        while pos < len(text) and text[pos] != ",":
            pos += 1
        pos += 1
    return ranges


def negotiate_json(accept: list[MediaRange]) -> str:
    """QIDO-RS and metadata answer DICOM JSON only; application/json is the same bytes."""
    for media in accept:
        if media.covers(DICOM_JSON):
            return DICOM_JSON
        if media.covers("application/json"):
            return "application/json"
    raise NotAcceptable(
        "this service answers application/dicom+json (DICOM JSON); XML (application/dicom+xml) is not supported"
    )


def negotiate_instances(accept: list[MediaRange], stored_syntaxes: Iterable[str]) -> None:
    """Check that the stored files may be sent as they are (no transcoding here).

    Acceptable: `multipart/related; type="application/dicom"` with no transfer-syntax,
    `transfer-syntax=*`, or the syntax every requested instance is stored in; also
    `*/*` and `multipart/related` without a type. Raises NotAcceptable otherwise.
    """
    stored = set(stored_syntaxes)
    for media in accept:
        if media.media_type in ("*/*", "multipart/*"):
            return
        if media.media_type == MULTIPART_RELATED and media.related_type in ("", DICOM, "application/*", "*/*"):
            wanted = media.transfer_syntax
            if wanted in ("", "*") or stored <= {wanted}:
                return
    if any(m.media_type == MULTIPART_RELATED and m.related_type == DICOM and m.transfer_syntax for m in accept):
        names = ", ".join(sorted(f"{ts} ({UID(ts).name})" for ts in stored))
        raise NotAcceptable(
            f"the instances are stored as {names} and are sent as stored: ask for transfer-syntax=* or that syntax"
        )
    raise NotAcceptable('instances are sent as multipart/related; type="application/dicom"')


class FrameEncoding(enum.Enum):
    NATIVE = "native"  # decoded, uncompressed little-endian bytes (application/octet-stream)
    STORED = "stored"  # the frames exactly as stored (compressed ones in their own media type)


def negotiate_frames(accept: list[MediaRange], transfer_syntax: str) -> FrameEncoding:
    """Decide how frames of an instance stored in `transfer_syntax` go out.

    - `application/octet-stream` (the default, also for `*/*`): native pixels,
      decoded when the file is compressed (PS3.18: Explicit VR Little Endian frames);
      with `transfer-syntax=*`, the frames as stored.
    - `image/jpeg`, `image/jp2`, `image/jls`, `image/dicom-rle`, ...: the compressed
      frames as stored, when that is the stored syntax's media type (no transcoding).
    """
    stored_type = FRAME_MEDIA_TYPES.get(transfer_syntax)
    for media in accept:
        related = media.related_type if media.media_type == MULTIPART_RELATED else ""
        if media.media_type in ("*/*", "multipart/*") or (media.media_type == MULTIPART_RELATED and not related):
            return FrameEncoding.NATIVE
        if media.media_type != MULTIPART_RELATED:
            continue
        if related in (OCTET_STREAM, "application/*", "*/*"):
            wanted = media.transfer_syntax
            if wanted == "*":
                return FrameEncoding.STORED
            if wanted in ("", ExplicitVRLittleEndian):
                return FrameEncoding.NATIVE
            if wanted == transfer_syntax:
                return FrameEncoding.STORED
        elif stored_type and (related == stored_type or related == "image/*"):
            if media.transfer_syntax in ("", "*", transfer_syntax):
                return FrameEncoding.STORED
    held = f"stored as {UID(transfer_syntax).name}"
    offer = f' or "{stored_type}"' if stored_type else ""
    raise NotAcceptable(f'frames are available as "application/octet-stream"{offer} ({held})')


RENDERED_TYPES = ("image/jpeg", "image/png")


def negotiate_rendered(accept: list[MediaRange]) -> str:
    """image/jpeg (the PS3.18 default) or image/png."""
    for media in accept:
        for candidate in RENDERED_TYPES:
            if media.covers(candidate):
                return candidate
    raise NotAcceptable("rendered images are available as image/jpeg or image/png")


# --- multipart/related: reading ------------------------------------------------------------

READ_CHUNK = 1024 * 1024
MAX_PART_HEADER_BYTES = 16 * 1024


class MalformedMultipart(ValueError):
    """A request body that is not the multipart/related message it claims to be (HTTP 400)."""


def stow_boundary(content_type: str | None) -> str:
    """Validate a STOW-RS request Content-Type; return its boundary.

    Raises UnsupportedMediaType for anything but `multipart/related` with DICOM parts
    (PS3.18 10.5: metadata + bulk data bodies are not supported here), and
    MalformedMultipart when the boundary is missing.
    """
    media = parse_media_type(content_type or "")
    if media.media_type != MULTIPART_RELATED:
        shown = media.media_type or "none"
        raise UnsupportedMediaType(
            f'Content-Type {shown} is not supported: send multipart/related; type="application/dicom"'
        )
    part_type = media.related_type or DICOM
    if part_type != DICOM:
        raise UnsupportedMediaType(
            f'multipart/related; type="{part_type}" is not supported: only type="application/dicom" '
            "(Part 10 files) is stored; metadata and bulk data requests are not"
        )
    boundary = media.params.get("boundary", "")
    if not boundary:
        raise MalformedMultipart("the multipart/related Content-Type has no boundary parameter")
    if len(boundary) > 70:
        raise MalformedMultipart("the multipart boundary is longer than the 70 characters RFC 2046 allows")
    return boundary


class MultipartReader:
    """Stream the parts of a multipart body (RFC 2046) from a file-like object.

    Nothing is held whole: each part is read through `Part.read` in chunks up to the
    next delimiter, so a large instance passes through memory once, in pieces, on its
    way to the store. Parts must be read in order (the next one starts where the
    previous one ended; an unread remainder is skipped).
    """

    def __init__(self, stream: BinaryIO, boundary: str, *, chunk_size: int = READ_CHUNK) -> None:
        self.stream = stream
        self.chunk_size = chunk_size
        # Searching for CRLF--boundary also finds the first boundary at the very
        # start of the body once a CRLF is put in front of it.
        self.delimiter = b"\r\n--" + boundary.encode("latin-1")
        self.buffer = bytearray(b"\r\n")
        self.eof = False
        self.bytes_read = 0

    def _fill(self) -> bool:
        if self.eof:
            return False
        chunk = self.stream.read(self.chunk_size)
        if not chunk:
            self.eof = True
            return False
        self.bytes_read += len(chunk)
        self.buffer += chunk
        return True

    def _find(self, needle: bytes, limit: int | None = None) -> int:
        """Position of `needle` in the buffer, reading more until found, EOF or `limit`."""
        start = 0
        while True:
            index = self.buffer.find(needle, start)
            if index >= 0:
                return index
            if limit is not None and len(self.buffer) > limit:
                return -1
            start = max(0, len(self.buffer) - len(needle) + 1)
            if not self._fill():
                return -1

    def parts(self) -> Iterator[Part]:
        """Yield each part in turn; raises MalformedMultipart at the first defect."""
        index = self._find(self.delimiter)
        if index < 0:
            raise MalformedMultipart("the body does not contain the boundary given in Content-Type")
        del self.buffer[: index + len(self.delimiter)]
        number = 0
        while True:
            if self._at_close():
                return
            headers = self._read_headers()
            number += 1
            part = Part(self, headers, number)
            yield part
            part.drain()

    def _at_close(self) -> bool:
        """After a delimiter: `--` closes the body; otherwise padding, CRLF, a part."""
        while len(self.buffer) < 2 and self._fill():
            pass
        if self.buffer[:2] == b"--":
            return True
        end = self._find(b"\r\n", limit=1024)
        if end < 0 or self.buffer[:end].strip(b" \t"):
            raise MalformedMultipart("a multipart boundary is not followed by CRLF or '--'")
        del self.buffer[: end + 2]
        return False

    def _read_headers(self) -> dict[str, str]:
        while len(self.buffer) < 2 and self._fill():
            pass
        if self.buffer[:2] == b"\r\n":  # a part without headers
            del self.buffer[:2]
            return {}
        end = self._find(b"\r\n\r\n", limit=MAX_PART_HEADER_BYTES)
        if end < 0:
            if self.eof:
                raise MalformedMultipart("the body ends inside the headers of a part")
            raise MalformedMultipart(f"the headers of a part are longer than {MAX_PART_HEADER_BYTES} bytes")
        raw = bytes(self.buffer[:end]).decode("latin-1")
        del self.buffer[: end + 4]
        headers: dict[str, str] = {}
        for line in raw.split("\r\n"):
            name, sep, value = line.partition(":")
            if not sep or not name.strip():
                raise MalformedMultipart(f"a part header line is not 'Name: value': {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
        return headers

    def _read_body(self, size: int) -> tuple[bytes, bool]:
        """Up to `size` bytes of the current part's body, and whether it has ended."""
        keep = len(self.delimiter) - 1
        while True:
            index = self.buffer.find(self.delimiter)
            if index >= 0:
                take = index if size < 0 else min(size, index)
                data = bytes(self.buffer[:take])
                del self.buffer[:take]
                if take == index:
                    del self.buffer[: len(self.delimiter)]
                    return data, True
                return data, False
            available = len(self.buffer) - keep
            if size >= 0 and available >= size:
                data = bytes(self.buffer[:size])
                del self.buffer[:size]
                return data, False
            if not self._fill():
                raise MalformedMultipart("the body ends before the closing boundary")


class Part:
    """One part of a multipart body: its headers, and its body as a read-once stream."""

    def __init__(self, reader: MultipartReader, headers: dict[str, str], number: int) -> None:
        self._reader = reader
        self.headers = headers
        self.number = number
        self.done = False

    @property
    def content_type(self) -> MediaRange:
        return parse_media_type(self.headers.get("content-type", ""))

    @property
    def location(self) -> str:
        return self.headers.get("content-location", "")

    def read(self, size: int = -1) -> bytes:
        if self.done or size == 0:
            return b""
        data, self.done = self._reader._read_body(size if size is not None else -1)
        return data

    def drain(self) -> None:
        """Skip what the consumer left unread, up to the next delimiter."""
        while not self.done:
            self.read(self._reader.chunk_size)


class ChainedReader:
    """A read-only stream: `head` first, then the rest of `stream` (no copy of either)."""

    def __init__(self, head: bytes, stream: BinaryIO | Part) -> None:
        self.head = memoryview(head)
        self.stream = stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size is None or size < 0:
            data, self.head = bytes(self.head) + self.stream.read(), memoryview(b"")
            return data
        data, self.head = bytes(self.head[:size]), self.head[size:]
        if len(data) < size:
            data += self.stream.read(size - len(data))
        return data


def read_head(stream: BinaryIO | Part, size: int) -> bytes:
    """Read up to `size` bytes (fewer only at the end of the stream)."""
    pieces = []
    left = size
    while left > 0:
        piece = stream.read(left)
        if not piece:
            break
        pieces.append(piece)
        left -= len(piece)
    return b"".join(pieces)


# --- multipart/related: writing ------------------------------------------------------------


@dataclass
class OutPart:
    """One part of a multipart answer: its Content-Type and its body, in chunks."""

    content_type: str
    chunks: Iterable[bytes]
    location: str = ""


def new_boundary() -> str:
    return f"precedent-{uuid.uuid4().hex}"


def multipart_content_type(part_type: str, boundary: str, **params: str) -> str:
    extra = "".join(f"; {name.replace('_', '-')}={value}" for name, value in params.items())
    return f'{MULTIPART_RELATED}; type="{part_type}"; boundary={boundary}{extra}'


def multipart_body(parts: Iterable[OutPart], boundary: str) -> Iterator[bytes]:
    """Encode parts as a multipart/related body, lazily (each part's chunks in turn)."""
    for part in parts:
        head = f"--{boundary}\r\nContent-Type: {part.content_type}\r\n"
        if part.location:
            head += f"Content-Location: {part.location}\r\n"
        yield (head + "\r\n").encode("latin-1")
        yield from part.chunks
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("latin-1")


def file_chunks(path: Path, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
    """A stored file in chunks, opened only when the answer reaches it."""
    with path.open("rb") as fh:
        while chunk := fh.read(chunk_size):
            yield chunk


# --- the DICOM JSON model (PS3.18 Annex F) -------------------------------------------------


def tag_key(tag: int) -> str:
    """0x00100020 → "00100020" (the DICOM JSON object key)."""
    return f"{tag:08X}"


def json_element(vr: str, values: list[Any] | None) -> dict[str, Any]:
    """One attribute; empty values give `{"vr": ...}` alone (F.2.5: no Value)."""
    kept = [v for v in values or [] if v not in (None, "")]
    return {"vr": vr, "Value": kept} if kept else {"vr": vr}


def person_name(raw: str) -> dict[str, str] | None:
    """A raw PN string (`Family^Given=ideographic=phonetic`) → its JSON object."""
    if not raw:
        return None
    groups = raw.split("=")
    names = dict(zip(("Alphabetic", "Ideographic", "Phonetic"), groups, strict=False))
    return {key: value for key, value in names.items() if value} or None


def format_da(value: dt.date | None) -> str:
    return value.strftime("%Y%m%d") if value else ""


def format_tm(value: dt.time | None) -> str:
    if value is None:
        return ""
    text = value.strftime("%H%M%S")
    return f"{text}.{value.microsecond:06d}" if value.microsecond else text


# --- attributes QIDO-RS matches and returns -------------------------------------------------


class Level(enum.StrEnum):
    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"


LEVEL_DEPTH = {Level.STUDY: 0, Level.SERIES: 1, Level.INSTANCE: 2}


@dataclass(frozen=True)
class Attribute:
    """An attribute the archive keeps per study, series or instance (in its rows)."""

    keyword: str
    level: Level
    matchable: bool = True

    @property
    def tag(self) -> int:
        tag = tag_for_keyword(self.keyword)
        assert tag is not None, self.keyword
        return tag

    @property
    def vr(self) -> str:
        return dictionary_VR(self.tag)


def _attributes(level: Level, *keywords: str, computed: tuple[str, ...] = ()) -> dict[str, Attribute]:
    found = {k: Attribute(k, level) for k in keywords}
    found.update({k: Attribute(k, level, matchable=False) for k in computed})
    return found


ATTRIBUTES: dict[str, Attribute] = {
    **_attributes(
        Level.STUDY,
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "StudyDescription",
        "InstitutionName",
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
        computed=("NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    ),
    **_attributes(
        Level.SERIES,
        "Modality",
        "SeriesDescription",
        "SeriesInstanceUID",
        "SeriesNumber",
        "BodyPartExamined",
        "Manufacturer",
        "ManufacturerModelName",
        computed=("NumberOfSeriesRelatedInstances",),
    ),
    **_attributes(
        Level.INSTANCE,
        "SOPClassUID",
        "SOPInstanceUID",
        "InstanceNumber",
        "ViewPosition",
        "Rows",
        "Columns",
        "NumberOfFrames",
        "SamplesPerPixel",
        "BitsAllocated",
        "BitsStored",
        "PhotometricInterpretation",
        "AvailableTransferSyntaxUID",
    ),
}

# PS3.18 Table 10.6.3-3 (study), -4 (series), -5 (instance): what every answer carries.
# Specific Character Set is left out because DICOM JSON is always UTF-8 (F.2), and
# attributes the archive does not keep (TimezoneOffsetFromUTC, InstanceAvailability
# beyond ONLINE, Performed Procedure Step dates, Request Attributes) are not invented.
REQUIRED: dict[Level, tuple[str, ...]] = {
    Level.STUDY: (
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "InstanceAvailability",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "RetrieveURL",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    Level.SERIES: (
        "Modality",
        "SeriesDescription",
        "RetrieveURL",
        "SeriesInstanceUID",
        "SeriesNumber",
        "NumberOfSeriesRelatedInstances",
    ),
    Level.INSTANCE: (
        "SOPClassUID",
        "SOPInstanceUID",
        "InstanceAvailability",
        "RetrieveURL",
        "InstanceNumber",
        "Rows",
        "Columns",
        "BitsAllocated",
        "NumberOfFrames",
    ),
}

# Returned at every level, made up by the archive rather than kept in its rows.
COMPUTED = ("InstanceAvailability", "RetrieveURL")

# Query parameters of PS3.18 8.3.4 that are not attribute matches.
_CONTROL_PARAMETERS = {"limit", "offset", "includefield", "fuzzymatching", "emptyvaluematching"}
_CONTROL_PARAMETERS |= {"multiplevaluematching", "accept", "charset"}


@dataclass(frozen=True)
class Match:
    """One matching key of a query (PS3.4 C.2.2.2), parsed and validated."""

    attribute: Attribute
    kind: str  # "single", "wildcard", "list", "range"
    values: tuple[Any, ...] = ()
    low: Any = None
    high: Any = None


@dataclass
class QidoQuery:
    level: Level
    matches: list[Match] = field(default_factory=list)
    include: list[str] = field(default_factory=list)
    include_all: bool = False
    limit: int = 0
    offset: int = 0
    warnings: list[str] = field(default_factory=list)
    # Whether the server's maximum, not the client's limit, bounds the page: only then
    # does a fuller result call for the "more results" Warning.
    capped: bool = True

    def returned(self, levels: Iterable[Level]) -> list[str]:
        """Keywords to return: required ones of `levels`, matching keys, includefields."""
        keywords: list[str] = []
        for level in levels:
            keywords += REQUIRED[level]
            if self.include_all:
                keywords += [a.keyword for a in ATTRIBUTES.values() if a.level == level]
        keywords += [m.attribute.keyword for m in self.matches]
        keywords += self.include
        return list(dict.fromkeys(keywords))


class QidoError(ValueError):
    """A query the standard calls invalid (HTTP 400), with the reason."""


_DA_RE = re.compile(r"^\d{8}$")
_TM_RE = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?$")
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def attribute_tag(key: str) -> int | None:
    """A query key as a tag: "00100020", "0010,0020" or a keyword; None if unknown."""
    text = key.strip()
    compact = text.replace(",", "")
    if re.fullmatch(r"[0-9A-Fa-f]{8}", compact):
        return int(compact, 16)
    tag = tag_for_keyword(text)
    return int(tag) if tag is not None else None


def _keyword(tag: int) -> str:
    return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def parse_qido(params: Iterable[tuple[str, str]], level: Level, *, service: str, max_results: int) -> QidoQuery:
    """Query parameters of a QIDO-RS request → a validated QidoQuery.

    Matching follows PS3.4 C.2.2.2: single value, wildcard (`*`, `?`) on strings,
    UID lists (comma or backslash separated, or the key repeated), date and time
    ranges (`a-b`, `-b`, `a-`), any-of lists for ModalitiesInStudy. Keys are tags
    (`00100020`, `0010,0020`) or keywords. An empty value asks for the attribute to be
    returned (universal matching).

    Per PS3.18 8.3.4, parameters that cannot be honoured are ignored with a Warning
    (collected in `warnings`): fuzzymatching=true, keys of attributes this archive
    does not match on, unknown keys. Invalid values (a malformed date, a negative
    limit) raise QidoError. UIDs in the URL are applied by the caller, ANDed with these.
    """
    query = QidoQuery(level=level, limit=max_results)
    values: dict[str, list[str]] = {}
    for raw_key, raw_value in params:
        key = raw_key.strip()
        lowered = key.lower()
        if lowered in _CONTROL_PARAMETERS:
            _control(query, lowered, raw_value, service=service, max_results=max_results)
            continue
        if "." in key:
            query.warnings.append(_warning(service, f"Sequence matching ({key}) is not supported; the key was ignored"))
            continue
        tag = attribute_tag(key)
        if tag is None:
            query.warnings.append(_warning(service, f"{key} is not a DICOM attribute or query parameter; ignored"))
            continue
        values.setdefault(_keyword(tag), []).append(raw_value)
    for keyword, given in values.items():
        attribute = ATTRIBUTES.get(keyword)
        if attribute is None or LEVEL_DEPTH[attribute.level] > LEVEL_DEPTH[level]:
            query.warnings.append(
                _warning(service, f"{keyword} is not supported for matching at the {level} level; the key was ignored")
            )
            continue
        match = _match(attribute, given)
        if match is None:
            query.include.append(keyword)
        elif not attribute.matchable:
            query.warnings.append(_warning(service, f"{keyword} is not supported for matching; the key was ignored"))
            query.include.append(keyword)
        else:
            query.matches.append(match)
    return query


def _control(query: QidoQuery, name: str, value: str, *, service: str, max_results: int) -> None:
    if name in ("limit", "offset"):
        try:
            number = int(value)
        except ValueError:
            raise QidoError(f"{name} must be a non-negative integer, got {value!r}") from None
        if number < 0:
            raise QidoError(f"{name} must be a non-negative integer, got {value!r}")
        if name == "offset":
            query.offset = number
        else:
            # limit=0 is read as "no limit of my own": the server's maximum applies.
            query.capped = number == 0 or number > max_results
            query.limit = max_results if query.capped else number
    elif name == "includefield":
        for item in (v.strip() for v in value.split(",")):
            if not item:
                continue
            if item.lower() == "all":
                query.include_all = True
                continue
            tag = attribute_tag(item)
            keyword = _keyword(tag) if tag is not None else item
            attribute = ATTRIBUTES.get(keyword)
            if keyword in COMPUTED:
                query.include.append(keyword)
            elif attribute is None or LEVEL_DEPTH[attribute.level] > LEVEL_DEPTH[query.level]:
                query.warnings.append(
                    _warning(service, f"includefield {item} is not available at the {query.level} level; ignored")
                )
            else:
                query.include.append(keyword)
    elif name == "fuzzymatching":
        if value.strip().lower() == "true":
            query.warnings.append(
                _warning(
                    service, "The fuzzymatching parameter is not supported. Only literal matching has been performed."
                )
            )
    elif name in ("emptyvaluematching", "multiplevaluematching"):
        if value.strip().lower() == "true":
            kind = "Empty Value" if name == "emptyvaluematching" else "Multiple Value"
            query.warnings.append(
                _warning(service, f"The {name} parameter is not supported. {kind} Matching has not been performed.")
            )


def _warning(service: str, text: str) -> str:
    """One Warning header value (RFC 7234 5.5: code, agent, quoted text)."""
    quoted = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'299 {service} "{quoted}"'


def _match(attribute: Attribute, given: list[str]) -> Match | None:
    vr = attribute.vr
    keyword = attribute.keyword
    items = [v for v in given if v != ""]
    if not items:
        return None
    if vr == "UI" or keyword == "ModalitiesInStudy":
        uids = tuple(u.strip() for v in items for u in re.split(r"[\\,]", v) if u.strip())
        for uid in uids:
            if vr == "UI" and not _UID_RE.match(uid):
                raise QidoError(f"{keyword}: {uid!r} is not a UID (digits and dots; no wildcards)")
        return Match(attribute, "list", uids)
    if len(items) > 1:
        raise QidoError(f"{keyword} is given more than once; give one value (or a range)")
    value = items[0]
    if vr == "DA":
        return _range(attribute, value, _parse_da)
    if vr == "TM":
        return _range(attribute, value, _parse_tm)
    if vr in ("IS", "US", "SL", "UL", "SS"):
        try:
            return Match(attribute, "single", (int(value),))
        except ValueError:
            raise QidoError(f"{keyword} must be an integer, got {value!r}") from None
    if "*" in value or "?" in value:
        return Match(attribute, "wildcard", (value,))
    return Match(attribute, "single", (value,))


def _range(attribute: Attribute, value: str, parse: Callable[[str, str], tuple[Any, Any]]) -> Match:
    """A single date/time (the span it stands for) or a range; both ends inclusive."""
    keyword = attribute.keyword
    if "-" not in value:
        low, high = parse(keyword, value)
        return Match(attribute, "range", low=low, high=high)
    low_text, _, high_text = value.partition("-")
    if not low_text and not high_text:
        raise QidoError(f"{keyword}: a range needs a start, an end or both, got {value!r}")
    low = parse(keyword, low_text)[0] if low_text else None
    high = parse(keyword, high_text)[1] if high_text else None
    if low is not None and high is not None and low > high:
        raise QidoError(f"{keyword}: the range {value!r} starts after it ends")
    return Match(attribute, "range", low=low, high=high)


def _parse_da(keyword: str, text: str) -> tuple[dt.date, dt.date]:
    if not _DA_RE.match(text):
        raise QidoError(f"{keyword}: {text!r} is not a DICOM date (YYYYMMDD, or a range YYYYMMDD-YYYYMMDD)")
    try:
        day = dt.datetime.strptime(text, "%Y%m%d").date()
    except ValueError:
        raise QidoError(f"{keyword}: {text!r} is not a valid date") from None
    return day, day


def _parse_tm(keyword: str, text: str) -> tuple[dt.time, dt.time]:
    """A TM value as the span of times it stands for ("10" is 10:00:00 to 10:59:59.999999)."""
    match = _TM_RE.match(text)
    if not match:
        raise QidoError(f"{keyword}: {text!r} is not a DICOM time (HHMMSS.FFFFFF, or a range)")
    hour, minute, second, fraction = match.groups()
    try:
        low = dt.time(int(hour), int(minute or 0), int(second or 0), int((fraction or "0").ljust(6, "0")))
        if fraction is not None:
            return low, low
        high = dt.time(int(hour), int(minute) if minute else 59, int(second) if second else 59, 999999)
    except ValueError:
        raise QidoError(f"{keyword}: {text!r} is not a valid time") from None
    return low, high


def wildcard_regex(pattern: str) -> str:
    """A DICOM wildcard (`*` any run, `?` one character) as an anchored regular expression."""
    return "^" + "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern) + "$"


MORE_RESULTS = (
    "The number of results exceeded the maximum supported by the server. Additional results can be requested."
)


def more_results_warning(service: str) -> str:
    """PS3.18 8.3.4.3 (limit): the Warning for a page the server's maximum cut short."""
    return _warning(service, MORE_RESULTS)


# --- WADO-RS: frames and metadata ----------------------------------------------------------

PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)


def parse_frame_list(text: str, count: int) -> list[int]:
    """ "1,3,5" → [1, 3, 5]; ValueError for a malformed list, IndexError past `count`."""
    numbers = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit():
            raise ValueError(f"frame numbers are positive integers separated by commas, got {text!r}")
        numbers.append(int(item))
    for number in numbers:
        if not 1 <= number <= count:
            raise IndexError(f"frame {number} does not exist: the instance has {count} frame(s)")
    return numbers


def frames(path: Path, numbers: list[int], encoding: FrameEncoding) -> Iterator[bytes]:
    """The requested frames (1-based) of a stored file, one bytes object per frame.

    NATIVE gives uncompressed little-endian pixels: stored native pixels are sliced
    (and byte-swapped from big endian), compressed ones decoded with pydicom (colour
    as RGB). STORED gives compressed frames exactly as encapsulated in the file.
    """
    header = pydicom.dcmread(str(path), stop_before_pixels=True)
    count = int(header.get("NumberOfFrames") or 1)
    if header.file_meta.TransferSyntaxUID.is_encapsulated and encoding is FrameEncoding.NATIVE:
        yield from _decoded_frames(path, numbers)
    elif header.file_meta.TransferSyntaxUID.is_encapsulated:
        yield from _encapsulated_frames(pydicom.dcmread(str(path)), numbers, count)
    else:
        yield from _native_frames(pydicom.dcmread(str(path)), numbers, count)


def _encapsulated_frames(ds: Dataset, numbers: list[int], count: int) -> Iterator[bytes]:
    from pydicom.encaps import get_frame

    extended = None
    if "ExtendedOffsetTable" in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    for number in numbers:
        yield get_frame(ds.PixelData, number - 1, number_of_frames=count, extended_offsets=extended)


def _decoded_frames(path: Path, numbers: list[int]) -> Iterator[bytes]:
    from pydicom.pixels import iter_pixels

    # Decode each distinct frame once, in file order, then answer in the asked order.
    distinct = sorted({n - 1 for n in numbers})
    decoded = dict(zip(distinct, iter_pixels(str(path), indices=distinct), strict=True))
    for number in numbers:
        array = decoded[number - 1]
        yield array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def _native_frames(ds: Dataset, numbers: list[int], count: int) -> Iterator[bytes]:
    from pydicom.pixels.utils import get_expected_length

    keyword = next(k for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in ds)
    data: bytes = ds[keyword].value
    bits = int(ds.get("BitsAllocated") or 8)
    big_endian = not ds.file_meta.TransferSyntaxUID.is_little_endian
    if bits == 1:
        per_frame_bits = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1)
        bits_array = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
        for number in numbers:
            start = (number - 1) * per_frame_bits
            yield np.packbits(bits_array[start : start + per_frame_bits], bitorder="little").tobytes()
        return
    if big_endian and bits == 8 and ds[keyword].VR == "OW":
        # 8-bit samples in OW words: big endian swaps each pair of bytes.
        data = np.frombuffer(data + b"\0" * (len(data) % 2), dtype=">u2").astype("<u2").tobytes()
    length = get_expected_length(ds, "bytes") // count
    for number in numbers:
        frame = data[(number - 1) * length : number * length]
        if big_endian and bits in (16, 32, 64):
            width = bits // 8
            frame = np.frombuffer(frame, dtype=f">u{width}").astype(f"<u{width}").tobytes()
        yield frame


# For a reader without the download permission, binary values up to this size come
# inline in metadata; larger ones (a waveform, an encapsulated PDF or CDA document, an
# overlay) only as a BulkDataURI, which like the file and the frames needs download.
INLINE_BINARY_MAX = 1024
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})


def instance_metadata(path: Path, *, bulk_data_base: str, inline_binary_max: int | None = None) -> dict[str, Any]:
    """The header of a stored file in the DICOM JSON model (PS3.18 F.2), for WADO-RS
    metadata: every attribute but the File Meta group; Pixel Data as a BulkDataURI
    (`bulk_data_base`/7FE00010, which answers the frames) and never inline; other binary
    values inline (InlineBinary), or, above `inline_binary_max` bytes when it is given,
    as a BulkDataURI (`bulk_data_base`/tag: the bulk endpoint serves top-level ones).
    Values pydicom cannot convert are left out rather than failing the whole answer.
    AvailableTransferSyntaxUID tells viewers how the frames are stored.
    """
    if inline_binary_max is None:
        handler, threshold = None, 2**31
    else:

        def handler(elem) -> str:
            return f"{bulk_data_base}/{tag_key(int(elem.tag))}"

        threshold = inline_binary_max
    # defer_size keeps large values (the pixels) on disk: they are not needed here.
    ds = pydicom.dcmread(str(path), defer_size=1024)
    out: dict[str, Any] = {}
    for tag in ds.keys():
        key = tag_key(int(tag))
        if int(tag) in PIXEL_TAGS:
            raw = ds.get_item(tag)
            vr = getattr(raw, "VR", None) or ("OB" if ds.file_meta.TransferSyntaxUID.is_encapsulated else "OW")
            out[key] = {"vr": str(vr), "BulkDataURI": f"{bulk_data_base}/{key}"}
            continue
        try:
            out[key] = ds[tag].to_json_dict(bulk_data_element_handler=handler, bulk_data_threshold=threshold)
        except Exception:  # noqa: BLE001 - a malformed value drops that attribute only
            continue
    out[tag_key(0x00083002)] = json_element("UI", [str(ds.file_meta.TransferSyntaxUID)])
    return dict(sorted(out.items()))


def bulk_data(path: Path, tag: int) -> bytes | None:
    """The value of a top-level binary attribute of a stored file (what a BulkDataURI
    of `instance_metadata` names), or None when the file has no such binary value."""
    ds = pydicom.dcmread(str(path), specific_tags=[tag])
    elem = ds.get(tag)
    if elem is None or str(elem.VR) not in BINARY_VRS or not isinstance(elem.value, bytes):
        return None
    return elem.value


# --- WADO-RS: rendered parameters --------------------------------------------------------


@dataclass(frozen=True)
class RenderParams:
    """The rendered resource's query parameters (PS3.18 8.3.5): window, viewport, quality."""

    window: Window | None = None
    max_size: int | None = None
    quality: int = 90


def parse_render_params(params: dict[str, str]) -> RenderParams:
    """`window=center,width[,linear|linear-exact|sigmoid]`, `viewport=vw,vh[,...]`
    (the image fits inside vw×vh, aspect kept), `quality=1..100` (JPEG). ValueError
    with the reason for a malformed value."""
    window = None
    if params.get("window"):
        parts = [p.strip() for p in params["window"].split(",")]
        if len(parts) not in (2, 3):
            raise ValueError("window is center,width[,function]")
        try:
            center, width = float(parts[0]), float(parts[1])
        except ValueError:
            raise ValueError(f"window center and width must be numbers, got {params['window']!r}") from None
        function = (parts[2] if len(parts) == 3 else "linear").upper().replace("-", "_")
        if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID") or width <= 0:
            raise ValueError("window width must be positive and the function linear, linear-exact or sigmoid")
        window = Window(center, width, function)
    max_size = None
    if params.get("viewport"):
        try:
            sizes = [int(v) for v in params["viewport"].split(",")[:2]]
        except ValueError:
            raise ValueError(f"viewport is vw,vh in pixels, got {params['viewport']!r}") from None
        if len(sizes) != 2 or min(sizes) < 1 or max(sizes) > 8192:
            raise ValueError("viewport is vw,vh, each 1 to 8192 pixels")
        max_size = min(sizes)
    quality = 90
    if params.get("quality"):
        try:
            quality = int(params["quality"])
        except ValueError:
            quality = 0
        if not 1 <= quality <= 100:
            raise ValueError(f"quality is an integer from 1 to 100, got {params['quality']!r}")
    return RenderParams(window, max_size, quality)


# --- STOW-RS answers ---------------------------------------------------------------------

# Failure Reason (0008,1197) values, PS3.18 Table I.2-2 and PS3.7 C.
FAILURE_OUT_OF_RESOURCES = 0xA700
FAILURE_NOT_MATCHING_SOP_CLASS = 0xA900
FAILURE_CANNOT_UNDERSTAND = 0xC000
FAILURE_TRANSFER_SYNTAX = 0xC122
FAILURE_PROCESSING = 0x0110
FAILURE_DUPLICATE_INSTANCE = 0x0111
# Within the Cxxx "cannot understand" range, as other archives (dcm4chee) do: the
# instance belongs to another study than the one the request was sent to.
FAILURE_STUDY_MISMATCH = 0xC409


@dataclass(frozen=True)
class StoredInstance:
    sop_class_uid: str
    sop_instance_uid: str
    retrieve_url: str


@dataclass(frozen=True)
class FailedInstance:
    sop_class_uid: str
    sop_instance_uid: str
    reason: int
    text: str


@dataclass(frozen=True)
class HeaderUids:
    """UIDs read from the start of a part, before the store reads it: they name a
    failed instance in the answer and check the study of a study-targeted STOW."""

    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    is_part10: bool = False


_UID_TAGS = [Tag(0x00080016), Tag(0x00080018), Tag(0x0020000D)]


def header_uids(head: bytes) -> HeaderUids:
    """The SOP Class, SOP Instance and Study UIDs of a Part 10 file, from its start.

    Anything unreadable gives empty strings: the store gives the real reason.
    """
    is_part10 = len(head) >= 132 and head[128:132] == b"DICM"
    try:
        ds = pydicom.dcmread(io.BytesIO(head), stop_before_pixels=True, specific_tags=_UID_TAGS, force=True)
        values = [str(ds.get(tag).value).strip("\x00 ") if tag in ds else "" for tag in _UID_TAGS]
    except Exception:  # noqa: BLE001 - a cut-off or broken head simply tells us nothing
        values = ["", "", ""]
    return HeaderUids(*values, is_part10=is_part10)


def store_response(
    stored: list[StoredInstance], failed: list[FailedInstance], *, study_url: str = ""
) -> dict[str, Any]:
    """The Store Instances Response Module (PS3.18 Annex I) in DICOM JSON."""
    body: dict[str, Any] = {tag_key(0x00081190): json_element("UR", [study_url])}
    if stored:
        body[tag_key(0x00081199)] = {
            "vr": "SQ",
            "Value": [
                {
                    tag_key(0x00081150): json_element("UI", [s.sop_class_uid]),
                    tag_key(0x00081155): json_element("UI", [s.sop_instance_uid]),
                    tag_key(0x00081190): json_element("UR", [s.retrieve_url]),
                }
                for s in stored
            ],
        }
    if failed:
        body[tag_key(0x00081198)] = {
            "vr": "SQ",
            "Value": [
                {
                    tag_key(0x00081150): json_element("UI", [f.sop_class_uid]),
                    tag_key(0x00081155): json_element("UI", [f.sop_instance_uid]),
                    tag_key(0x00081197): json_element("US", [f.reason]),
                }
                for f in failed
            ],
        }
    return dict(sorted(body.items()))


def store_status(stored: int, failed: int) -> int:
    """PS3.18 10.5.3: 200 all stored, 202 some failed, 409 none stored."""
    if failed == 0:
        return 200
    return 202 if stored else 409


def failure_warning(service: str, failed: FailedInstance, part: int) -> str:
    """A Warning value naming one failed part and why, for people reading the answer."""
    who = failed.sop_instance_uid or f"part {part}"
    return _warning(service, f"{who} was not stored (0x{failed.reason:04X}): {failed.text}")
