"""The pure DICOMweb core (dicomweb/dicomweb.py): no Django, no database, real files."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import get_frame

from dicomweb import dicomweb as dw
from dicomweb.dicomweb import FrameEncoding, Level, NotAcceptable
from tests.dicomweb.conftest import CT, J2K, MR, MULTIFRAME, REPORT

SERVICE = "http://testserver/dicomweb"

# --- media types ---------------------------------------------------------------------------


def test_parse_media_type_and_accept():
    media = dw.parse_media_type('Multipart/Related; type="application/dicom"; boundary="a;b=c"; start=x')
    assert media.media_type == "multipart/related"
    assert media.related_type == "application/dicom"
    assert media.params == {"type": "application/dicom", "boundary": "a;b=c", "start": "x"}
    accept = dw.parse_accept('image/png;q=0.5, multipart/related; type="image/jp2"; transfer-syntax=*, image/gif;q=0')
    assert [(m.media_type, m.related_type, m.q) for m in accept] == [
        ("multipart/related", "image/jp2", 1.0),
        ("image/png", "", 0.5),
    ]
    assert accept[0].transfer_syntax == "*"
    assert dw.parse_accept(None) == [dw.MediaRange("*/*")] == dw.parse_accept("  ")
    assert dw.parse_accept('multipart/related; type="image/x-dicom-rle"')[0].related_type == "image/dicom-rle"


def test_negotiation():
    accept = dw.parse_accept
    assert dw.negotiate_json(accept(None)) == "application/dicom+json"
    assert dw.negotiate_json(accept("application/json")) == "application/json"
    with pytest.raises(NotAcceptable):
        dw.negotiate_json(accept("application/dicom+xml"))
    dw.negotiate_instances(accept('multipart/related; type="application/dicom"'), {"1.2.840.10008.1.2.4.90"})
    dw.negotiate_instances(accept('multipart/related; type="application/dicom"; transfer-syntax=*'), {"1.2"})
    with pytest.raises(NotAcceptable, match="sent as stored"):
        dw.negotiate_instances(
            accept('multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'),
            {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.1"},
        )
    with pytest.raises(NotAcceptable):
        dw.negotiate_instances(accept("application/zip"), {"1.2.840.10008.1.2.1"})
    j2k = "1.2.840.10008.1.2.4.90"
    assert dw.negotiate_frames(accept(None), j2k) is FrameEncoding.NATIVE
    assert (
        dw.negotiate_frames(accept('multipart/related; type="application/octet-stream"'), j2k) is FrameEncoding.NATIVE
    )
    stored = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
    assert dw.negotiate_frames(accept(stored), j2k) is FrameEncoding.STORED
    assert dw.negotiate_frames(accept('multipart/related; type="image/jp2"'), j2k) is FrameEncoding.STORED
    with pytest.raises(NotAcceptable, match='"image/jp2"'):
        dw.negotiate_frames(accept('multipart/related; type="image/jpeg"'), j2k)
    assert dw.negotiate_rendered(accept(None)) == "image/jpeg"
    assert dw.negotiate_rendered(accept("image/png, image/jpeg;q=0.4")) == "image/png"
    with pytest.raises(NotAcceptable):
        dw.negotiate_rendered(accept("image/gif"))


def test_stow_content_types():
    assert dw.stow_boundary('multipart/related; type="application/dicom"; boundary=abc') == "abc"
    assert dw.stow_boundary("multipart/related; boundary=abc") == "abc"
    for bad in ("application/dicom", "multipart/form-data; boundary=x", "", None):
        with pytest.raises(dw.UnsupportedMediaType):
            dw.stow_boundary(bad)
    with pytest.raises(dw.UnsupportedMediaType, match="metadata and bulk data"):
        dw.stow_boundary('multipart/related; type="application/dicom+xml"; boundary=x')
    with pytest.raises(dw.MalformedMultipart, match="no boundary"):
        dw.stow_boundary('multipart/related; type="application/dicom"')


# --- multipart -----------------------------------------------------------------------------


def _read_all(body: bytes, boundary: str, chunk_size: int = 7) -> list[tuple[dict, bytes]]:
    reader = dw.MultipartReader(io.BytesIO(body), boundary, chunk_size=chunk_size)
    return [(part.headers, dw.read_head(part, 1 << 30)) for part in reader.parts()]


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64, 1 << 20])
def test_multipart_round_trip_whatever_the_chunking(chunk_size):
    payloads = [b"", b"\r\n--bound", b"x" * 1000 + b"\r\n--boundar", bytes(range(256)) * 10]
    body = b"".join(
        dw.multipart_body(
            (dw.OutPart("application/dicom", [p[:5], p[5:]], location=f"/{i}") for i, p in enumerate(payloads)),
            "boundary",
        )
    )
    parts = _read_all(body, "boundary", chunk_size)
    assert [data for _, data in parts] == payloads
    assert parts[1][0] == {"content-type": "application/dicom", "content-location": "/1"}


def test_multipart_preamble_padding_epilogue_and_headerless_parts():
    body = (
        b"this preamble is ignored\r\n--b  \t\r\n\r\nfirst"
        b"\r\n--b\r\nContent-Type: application/dicom\r\nX-Other:  v \r\n\r\nsecond"
        b"\r\n--b--\r\nepilogue, ignored"
    )
    assert _read_all(body, "b") == [({}, b"first"), ({"content-type": "application/dicom", "x-other": "v"}, b"second")]


def test_dicomweb_client_encoding_is_read(dicom_files: Path):
    """dicomweb-client puts CRLF before the first boundary and none after the last."""
    from dicomweb_client import DICOMwebClient

    data = [(dicom_files / CT).read_bytes(), (dicom_files / MR).read_bytes()]
    content_type = 'multipart/related; type="application/dicom"; boundary="0f3cf5c0"'
    body = DICOMwebClient._encode_multipart_message(data, content_type)
    boundary = dw.stow_boundary(content_type)
    assert [payload for _, payload in _read_all(body, boundary, 4096)] == data


def test_unread_parts_are_skipped():
    body = b"--b\r\n\r\n" + b"a" * 5000 + b"\r\n--b\r\n\r\nsecond\r\n--b--"
    reader = dw.MultipartReader(io.BytesIO(body), "b", chunk_size=100)
    parts = reader.parts()
    first = next(parts)
    assert first.read(10) == b"a" * 10
    assert next(parts).read() == b"second"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"no delimiter at all", "does not contain the boundary"),
        (b"--b\r\n\r\nbody without an end", "ends before the closing boundary"),
        (b"--b\r\nContent-Type: x", "ends inside the headers"),
        (b"--b\r\nnot a header\r\n\r\nx\r\n--b--", "is not 'Name: value'"),
        (b"--b\r\nX: " + b"v" * 20000 + b"\r\n\r\nx\r\n--b--", "longer than"),
        (b"--bogus\r\n", "not followed by CRLF"),
        (b"--b", "not followed by CRLF"),
    ],
)
def test_malformed_multipart(body, reason):
    with pytest.raises(dw.MalformedMultipart, match=reason):
        _read_all(body, "b")


def test_chained_reader():
    reader = dw.ChainedReader(b"head-", io.BytesIO(b"rest"))
    assert reader.read(2) == b"he"
    assert reader.read(5) == b"ad-re"
    assert reader.read() == b"st"
    assert dw.ChainedReader(b"ab", io.BytesIO(b"cd")).read() == b"abcd"


def test_multipart_content_type():
    assert (
        dw.multipart_content_type("application/dicom", "xyz")
        == 'multipart/related; type="application/dicom"; boundary=xyz'
    )


# --- DICOM JSON ----------------------------------------------------------------------------


def test_json_values():
    assert dw.json_element("LO", ["a", "", None]) == {"vr": "LO", "Value": ["a"]}
    assert dw.json_element("PN", [None]) == {"vr": "PN"}
    assert dw.person_name("Yamada^Tarou=山田^太郎=やまだ^たろう") == {
        "Alphabetic": "Yamada^Tarou",
        "Ideographic": "山田^太郎",
        "Phonetic": "やまだ^たろう",
    }
    assert dw.person_name("=山田") == {"Ideographic": "山田"}
    assert dw.person_name("") is None
    assert dw.format_da(dt.date(2024, 1, 2)) == "20240102"
    assert dw.format_tm(dt.time(7, 27, 30)) == "072730"
    assert dw.format_tm(dt.time(13, 26, 45, 921000)) == "132645.921000"
    assert dw.tag_key(0x7FE00010) == "7FE00010"


# --- QIDO-RS parsing -----------------------------------------------------------------------


def parse(query: str, level: Level = Level.STUDY, max_results: int = 100) -> dw.QidoQuery:
    from urllib.parse import parse_qsl

    return dw.parse_qido(parse_qsl(query, keep_blank_values=True), level, service=SERVICE, max_results=max_results)


def test_attribute_keys():
    assert dw.attribute_tag("PatientID") == dw.attribute_tag("00100020") == dw.attribute_tag("0010,0020") == 0x00100020
    assert dw.attribute_tag("7fe00010") == 0x7FE00010
    assert dw.attribute_tag("NotAKeyword") is None


def test_matching_kinds():
    query = parse("PatientName=Doe*&StudyDate=20240101-20240131&StudyTime=10&StudyInstanceUID=1.2,3.4&PatientID=X")
    kinds = {m.attribute.keyword: m for m in query.matches}
    assert kinds["PatientName"].kind == "wildcard" and kinds["PatientName"].values == ("Doe*",)
    assert (kinds["StudyDate"].low, kinds["StudyDate"].high) == (dt.date(2024, 1, 1), dt.date(2024, 1, 31))
    assert (kinds["StudyTime"].low, kinds["StudyTime"].high) == (dt.time(10), dt.time(10, 59, 59, 999999))
    assert kinds["StudyInstanceUID"].values == ("1.2", "3.4")
    assert kinds["PatientID"].kind == "single"
    single_day = parse("StudyDate=20240101").matches[0]
    assert single_day.low == single_day.high == dt.date(2024, 1, 1)
    open_end = parse("StudyDate=20240101-").matches[0]
    assert (open_end.low, open_end.high) == (dt.date(2024, 1, 1), None)
    assert parse("StudyTime=101530.5").matches[0].low == dt.time(10, 15, 30, 500000)
    assert parse("ModalitiesInStudy=CT\\MR").matches[0].values == ("CT", "MR")
    assert parse("SeriesNumber=3", Level.SERIES).matches[0].values == (3,)


def test_empty_values_and_includefield_ask_for_attributes():
    query = parse("PatientName=&includefield=StudyDescription,00080080&includefield=RetrieveURL")
    assert query.matches == []
    assert sorted(query.include) == ["InstitutionName", "PatientName", "RetrieveURL", "StudyDescription"]
    assert parse("includefield=all").include_all
    returned = parse("includefield=all").returned([Level.STUDY])
    assert "StudyDescription" in returned and "SOPClassUID" not in returned


def test_returned_attributes():
    query = parse("Modality=CT&includefield=BodyPartExamined", Level.SERIES)
    returned = query.returned([Level.SERIES, Level.STUDY])
    assert returned[: len(dw.REQUIRED[Level.SERIES])] == list(dw.REQUIRED[Level.SERIES])
    assert "PatientID" in returned and "BodyPartExamined" in returned
    assert len(returned) == len(set(returned))


def test_warnings_for_what_is_ignored():
    query = parse(
        "fuzzymatching=true&Foo=1&OperatorsName=x&00081032.00080100=y&NumberOfStudyRelatedSeries=2&includefield=Nope"
    )
    text = " | ".join(query.warnings)
    assert all(w.startswith(f'299 {SERVICE} "') and w.endswith('"') for w in query.warnings)
    assert "The fuzzymatching parameter is not supported. Only literal matching has been performed." in text
    assert "Foo is not a DICOM attribute" in text
    assert "OperatorsName is not supported for matching at the study level" in text
    assert "Sequence matching (00081032.00080100)" in text
    assert "NumberOfStudyRelatedSeries is not supported for matching" in text
    assert "includefield Nope is not available" in text
    assert "NumberOfStudyRelatedSeries" in query.include  # returned nonetheless
    assert parse("fuzzymatching=false").warnings == []
    assert "Empty Value Matching has not been performed" in parse("emptyvaluematching=true").warnings[0]
    assert "at the study level" in parse("includefield=SOPClassUID").warnings[0]


def test_limit_and_offset():
    assert (parse("").limit, parse("").capped) == (100, True)
    assert (parse("limit=5").limit, parse("limit=5").capped) == (5, False)
    assert (parse("limit=500").limit, parse("limit=500").capped) == (100, True)
    assert (parse("limit=0").limit, parse("offset=7").offset) == (100, 7)


@pytest.mark.parametrize(
    "query",
    ["StudyDate=2024", "StudyDate=20241301", "StudyDate=2-", "StudyTime=1", "StudyTime=24", "limit=x", "offset=-2",
     "StudyInstanceUID=1.*", "PatientID=a&PatientID=b", "SeriesNumber=one"],
)  # fmt: skip
def test_invalid_queries(query):
    with pytest.raises(dw.QidoError):
        parse(query, Level.SERIES)


def test_wildcard_regex():
    import re

    pattern = dw.wildcard_regex("Doe^J?hn*")
    assert re.match(pattern, "Doe^John Q") and re.match(pattern, "Doe^Jahn")
    assert not re.match(pattern, "Doe^Jhn") and not re.match(pattern, "xDoe^John")
    assert re.match(dw.wildcard_regex("a.b(c)+"), "a.b(c)+") and not re.match(dw.wildcard_regex("a.b"), "axb")


# --- WADO-RS -------------------------------------------------------------------------------


def test_frame_lists():
    assert dw.parse_frame_list("1,3, 2", 3) == [1, 3, 2]
    with pytest.raises(ValueError):
        dw.parse_frame_list("1,,2", 3)
    with pytest.raises(IndexError):
        dw.parse_frame_list("4", 3)


def test_native_frames_of_every_native_layout(dicom_files: Path):
    """Little and big endian, 8 to 32 bits, colour, 1-bit SEG: the frame bytes are the
    little-endian pixels pydicom decodes."""
    for name in (
        CT,
        MULTIFRAME,
        "pydicom-data/emri_small_big_endian.dcm",
        "pydicom-test_files/SC_rgb_small_odd_big_endian.dcm",
        "pydicom-test_files/rtdose_expb.dcm",
        "pydicom-test_files/image_dfl.dcm",
        "pydicom-data/liver.dcm",
    ):
        path = dicom_files / name
        ds = pydicom.dcmread(path)
        count = int(ds.get("NumberOfFrames") or 1)
        numbers = [count, 1] if count > 1 else [1]
        got = list(dw.frames(path, numbers, FrameEncoding.NATIVE))
        pixels = ds.pixel_array.reshape((count, *ds.pixel_array.shape[-3 if ds.SamplesPerPixel > 1 else -2 :]))
        for number, frame in zip(numbers, got, strict=True):
            expected = pixels[number - 1]
            if ds.BitsAllocated == 1:
                expected_bytes = np.packbits(expected.ravel(), bitorder="little").tobytes()
            else:
                expected_bytes = expected.astype(expected.dtype.newbyteorder("<")).tobytes()
            assert frame == expected_bytes, name


def test_compressed_frames(dicom_files: Path):
    path = dicom_files / "pydicom-data/emri_small_jpeg_2k_lossless.dcm"
    ds = pydicom.dcmread(path)
    stored = list(dw.frames(path, [3], FrameEncoding.STORED))
    assert stored == [get_frame(ds.PixelData, 2, number_of_frames=10)]
    (native,) = dw.frames(path, [3], FrameEncoding.NATIVE)
    assert np.frombuffer(native, dtype="<u2").reshape(64, 64).tolist() == ds.pixel_array[2].tolist()
    # Native files sent "as stored" are their native frames.
    ct = dicom_files / CT
    assert list(dw.frames(ct, [1], FrameEncoding.STORED)) == [pydicom.dcmread(ct).PixelData]


def test_instance_metadata(dicom_files: Path):
    metadata = dw.instance_metadata(dicom_files / J2K, bulk_data_base="http://x/bulk")
    assert metadata["7FE00010"] == {"vr": "OB", "BulkDataURI": "http://x/bulk/7FE00010"}
    assert metadata["00083002"] == {"vr": "UI", "Value": ["1.2.840.10008.1.2.4.91"]}
    assert metadata["00100020"] == {"vr": "LO", "Value": ["8NM1"]}
    assert list(metadata) == sorted(metadata)
    report = dw.instance_metadata(dicom_files / REPORT, bulk_data_base="http://x/bulk")
    assert "7FE00010" not in report and report["0040A730"]["vr"] == "SQ"
    # A value pydicom cannot convert drops that attribute, not the answer.
    bad = dw.instance_metadata(dicom_files / "pydicom-test_files/badVR.dcm", bulk_data_base="b")
    assert "00100020" in bad


def test_render_params():
    params = dw.parse_render_params({"window": "40,400,linear-exact", "viewport": "512,256", "quality": "75"})
    assert params.window == dw.Window(40.0, 400.0, "LINEAR_EXACT")
    assert (params.max_size, params.quality) == (256, 75)
    assert dw.parse_render_params({}) == dw.RenderParams()
    for bad in ({"window": "a,b"}, {"window": "1,2,cubic"}, {"viewport": "10"}, {"quality": "101"}):
        with pytest.raises(ValueError):
            dw.parse_render_params(bad)


# --- STOW-RS answers -----------------------------------------------------------------------


def test_header_uids(dicom_files: Path):
    data = (dicom_files / CT).read_bytes()
    ds = pydicom.dcmread(dicom_files / CT)
    uids = dw.header_uids(data[:4096])
    assert (uids.sop_class_uid, uids.sop_instance_uid, uids.study_instance_uid, uids.is_part10) == (
        ds.SOPClassUID,
        ds.SOPInstanceUID,
        ds.StudyInstanceUID,
        True,
    )
    assert dw.header_uids(b"junk" * 10) == dw.HeaderUids()
    assert dw.header_uids(data[:200]).is_part10  # too short for the UIDs, still Part 10


def test_store_response_and_status():
    stored = [dw.StoredInstance("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "http://x/studies/1/series/2/instances/1.2.3")]
    failed = [dw.FailedInstance("", "", dw.FAILURE_CANNOT_UNDERSTAND, "junk")]
    body = dw.store_response(stored, failed, study_url="http://x/studies/1")
    ds = pydicom.Dataset.from_json(body)
    assert ds.RetrieveURL == "http://x/studies/1"
    assert ds.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == "1.2.3"
    assert ds.FailedSOPSequence[0].FailureReason == 0xC000
    assert list(body) == sorted(body)
    assert "00081198" not in dw.store_response(stored, [])
    assert dw.store_response([], [])["00081190"] == {"vr": "UR"}
    assert [dw.store_status(2, 0), dw.store_status(1, 1), dw.store_status(0, 2)] == [200, 202, 409]
    warning = dw.failure_warning(SERVICE, failed[0], 3)
    assert warning == f'299 {SERVICE} "part 3 was not stored (0xC000): junk"'
