"""The pure DICOM core on real files: header, validation reasons, decoding, windowing."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from studies import dicom
from studies.dicom import Window
from studies.errors import InvalidDicom, NotDicom, PixelDataError, RenderError, UnsupportedTransferSyntax
from studies.storage import DicomStore

TF = "pydicom-test_files"
PD = "pydicom-data"


def test_header_of_a_ct(dicom_files: Path):
    _, h = dicom.read_header(dicom_files / TF / "CT_small.dcm")
    assert h.modality == "CT"
    assert (h.rows, h.columns, h.number_of_frames) == (128, 128, 1)
    assert h.sop_instance_uid == "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
    assert h.study_instance_uid.startswith("1.3.6.1.4.1.5962")
    assert h.patient_name == "CompressedSamples^CT1"
    assert h.study_date is not None and h.study_date.year == 2004
    assert h.transfer_syntax_name == "Explicit VR Little Endian"
    assert h.has_pixel_data and h.photometric_interpretation == "MONOCHROME2"


@pytest.mark.parametrize(
    ("path", "error", "reason"),
    [
        (f"{TF}/no_meta.dcm", NotDicom, "no 128-byte preamble"),
        (f"{PD}/OT-PAL-8-face.dcm", NotDicom, "no 128-byte preamble"),
        (f"{TF}/meta_missing_tsyntax.dcm", InvalidDicom, "lacks TransferSyntaxUID"),
        (f"{TF}/UN_sequence.dcm", InvalidDicom, "missing SOPClassUID"),
        (f"{PD}/bad_sequence.dcm", InvalidDicom, "is not a valid DICOM UID"),
        (f"{PD}/emri_small_jpeg_2k_lossless_too_short.dcm", InvalidDicom, "file is truncated"),
        (f"{TF}/MR_truncated.dcm", PixelDataError, "Pixel Data is 8130 bytes"),
        (f"{TF}/badVR.dcm", InvalidDicom, "NumberOfFrames (0028,0008) is not a valid integer"),
        (f"{TF}/JPEG-lossy.dcm", PixelDataError, "cannot be decoded"),
        (f"{TF}/JPEG2000-embedded-sequence-delimiter.dcm", PixelDataError, "cannot be decoded"),
        (f"{TF}/dicomdirtests/DICOMDIR", InvalidDicom, "DICOMDIR"),
    ],
)
def test_broken_files_are_rejected_with_a_specific_reason(dicom_files: Path, path, error, reason):
    with pytest.raises(error) as caught:
        dicom.read_header(dicom_files / path)
    message = str(caught.value)
    assert reason in message
    assert "\n" not in message
    assert str(dicom_files) not in message  # no server paths in reasons


def test_empty_file(tmp_path: Path):
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with pytest.raises(NotDicom, match="empty file"):
        dicom.read_header(empty)


def test_unsupported_transfer_syntax(dicom_files: Path, tmp_path: Path):
    ds = pydicom.dcmread(dicom_files / TF / "JPEG2000.dcm")
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video: no decoder here
    target = tmp_path / "mpeg.dcm"
    ds.save_as(target, enforce_file_format=True)
    with pytest.raises(UnsupportedTransferSyntax, match="unsupported transfer syntax 1.2.840.10008.1.2.4.100"):
        dicom.read_header(target)


def test_gzip_wrapped_file_is_unwrapped_when_spooled(dicom_files: Path, tmp_path: Path):
    store = DicomStore(tmp_path, fsync=False)
    spooled = store.spool(dicom_files / TF / "zipMR.gz")
    assert spooled.size == len(gzip.open(dicom_files / TF / "zipMR.gz").read())
    _, h = dicom.read_header(spooled.path)
    assert h.modality == "MR"


def test_a_synced_store_names_a_file_only_after_its_fsync(dicom_files: Path, tmp_path: Path):
    from concurrent.futures import Future

    store = DicomStore(tmp_path, fsync=True)
    source = dicom_files / TF / "CT_small.dcm"
    spooled = store.spool(source)
    assert spooled.synced is not None  # syncing in the background while the caller parses
    placement = store.place([spooled])
    placement.wait_synced()
    [(relative, created)] = placement.files
    assert created and spooled.synced.done()
    assert store.path(relative).read_bytes() == source.read_bytes()

    failed = store.spool(dicom_files / TF / "MR_small.dcm")
    failed.synced.result()
    failed.synced = Future()
    failed.synced.set_exception(OSError(5, "Input/output error"))
    with pytest.raises(OSError, match="Input/output error"):
        store.place([failed])
    assert not store.path(store.relative_path(failed.sha256)).exists()
    failed.discard()


def test_modality_lut_applies_rescale(dicom_files: Path):
    path = dicom_files / TF / "CT_small.dcm"
    ds = pydicom.dcmread(path)
    values = dicom.decode_frame(path, ds)
    raw = ds.pixel_array.astype(np.float32)
    expected = raw * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(values, expected)


def test_linear_window_follows_the_standard():
    values = np.array([-1000.0, 39.5, 40.0, 79.0, 81.0, 1000.0], dtype=np.float32)
    out = dicom.apply_window(values, Window(40, 80))
    assert out[0] == 0.0 and out[-1] == 1.0
    # PS3.3 C.11.2.1.2.1: ((x - (c - 0.5)) / (w - 1) + 0.5) inside the window.
    assert out[2] == pytest.approx((40 - 39.5) / 79 + 0.5)
    assert np.all(np.diff(out) >= 0)


def test_monochrome1_is_inverted(dicom_files: Path, tmp_path: Path):
    source = dicom_files / PD / "RG3_J2KI.dcm"
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    values = dicom.decode_frame(source, ds)
    window = Window(float(values.mean()), float(values.std() * 4))
    mono1 = dicom.render(values, ds, window=window).image
    ds.PhotometricInterpretation = "MONOCHROME2"
    mono2 = dicom.render(values, ds, window=window).image
    np.testing.assert_array_equal(mono1.astype(int), 255 - mono2.astype(int))


def test_voi_lut_sequence_is_used_by_default(dicom_files: Path):
    path = dicom_files / PD / "vlut_04.dcm"
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert "VOILUTSequence" in ds
    values = dicom.decode_frame(path, ds)
    default = dicom.render(values, ds)
    auto = dicom.render(values, ds, preset="auto")
    assert default.window is None  # the LUT, not a window
    assert default.image.dtype == np.uint8 and default.image.max() > default.image.min()
    assert not np.array_equal(default.image, auto.image)


def test_multiframe_frames_differ_and_range_is_checked(dicom_files: Path):
    path = dicom_files / PD / "emri_small.dcm"
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    first, third = dicom.decode_frame(path, ds, 1), dicom.decode_frame(path, ds, 3)
    np.testing.assert_array_equal(third, pydicom.dcmread(path).pixel_array[2])
    assert not np.array_equal(first, third)
    with pytest.raises(RenderError, match="out of range 1..10"):
        dicom.decode_frame(path, ds, 11)


def test_palette_colour_becomes_rgb(dicom_files: Path):
    path = dicom_files / PD / "OBXXXX1A_rle.dcm"
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    rendered = dicom.render(dicom.decode_frame(path, ds), ds)
    assert rendered.image.shape == (600, 800, 3) and rendered.image.dtype == np.uint8


def test_cbis_mammogram_16bit_rle_renders_downscaled(datasets: Path, tmp_path: Path):
    path = next((datasets / "cbis-ddsm-mg-samples").rglob("*.dcm"))
    ds, h = dicom.read_header(path)
    assert h.modality == "MG" and h.bits_allocated == 16
    assert (h.rows, h.columns) == (4736, 2624) or (h.columns, h.rows) == (4736, 2624)
    header = dicom.read_dataset(path, stop_before_pixels=True)
    rendered = dicom.render(dicom.decode_frame(path, header), header, max_size=512)
    assert max(rendered.image.shape) == 512
    assert rendered.image.std() > 10  # an image, not a flat field


def test_rendered_png_remembers_its_window(tmp_path: Path):
    rendered = dicom.Rendered(np.zeros((4, 4), np.uint8), Window(40, 400))
    png = tmp_path / "x.png"
    png.write_bytes(dicom.encode_png(rendered))
    assert dicom.png_window(png) == Window(40, 400)


def test_dicomdir_lists_its_files(dicom_files: Path):
    files = dicom.dicomdir_files(dicom_files / TF / "dicomdirtests" / "DICOMDIR")
    assert len(files) == 31 and all(f.is_file() for f in files)


def test_nul_padding_never_reaches_the_database(dicom_files: Path, tmp_path: Path):
    ds = pydicom.dcmread(dicom_files / TF / "CT_small.dcm")
    ds.StudyDescription = "HEAD\x00\x00"
    target = tmp_path / "nul.dcm"
    shutil.copy(dicom_files / TF / "CT_small.dcm", target)
    ds.save_as(target, enforce_file_format=True)
    _, h = dicom.read_header(target)
    assert h.study_description == "HEAD"


def test_the_dataset_hash_is_read_from_wherever_the_file_is(dicom_files: Path, tmp_path: Path):
    """Only a duplicate check needs the dataset hash, after `place`: by then the spool
    was renamed into the store, or dropped because the same bytes were there already.
    Either way the hash reads the copy in the store, and it skips the File Meta."""
    import io

    from studies.storage import dataset_sha256

    store = DicomStore(tmp_path, fsync=False)
    source = dicom_files / TF / "CT_small.dcm"
    first, again = store.spool(source), store.spool(source)
    expected = dataset_sha256(first.path)
    assert store.place([first]).files[0][1] is True and not first.path.exists()
    assert store.place([again]).files[0][1] is False and not again.path.exists()
    assert first.dataset_sha256 == again.dataset_sha256 == expected != first.sha256
    # Another File Meta (as another route writes it), the same dataset: the same hash.
    ds = pydicom.dcmread(source)
    ds.file_meta.ImplementationVersionName = "OTHER_ROUTE"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    other = store.spool(io.BytesIO(buffer.getvalue()))
    assert other.sha256 != first.sha256 and other.dataset_sha256 == expected
    other.discard()


def _fresh_ct(dicom_files: Path, **changes) -> bytes:
    """CT_small.dcm with a fresh SOPInstanceUID and header changes (keyword=value, or
    keyword=(VR, value) to write a value its own VR would refuse)."""
    import io

    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import DataElement
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(dicom_files / TF / "CT_small.dcm")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in changes.items():
        if isinstance(value, tuple):
            tag = tag_for_keyword(keyword)
            ds[tag] = DataElement(tag, *value)
        else:
            setattr(ds, keyword, value)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize(
    ("where", "reason"),
    [
        ("inside the SOPInstanceUID's value", "needs"),
        ("inside the Pixel Data element's header", "the file ends inside an element header"),
        ("two bytes into an element header", "the file ends inside an element header"),
        ("inside the pixel data", "Pixel Data is"),
    ],
)
def test_a_cut_file_is_refused_wherever_the_cut_falls(dicom_files: Path, tmp_path: Path, where, reason):
    """pydicom reads a file cut short without a word: as a shorter file with a UID
    missing its last digits, or a CT slice without pixels. Each must be refused."""
    data = _fresh_ct(dicom_files)
    ds = pydicom.dcmread(__import__("io").BytesIO(data), defer_size=64)
    sop = ds.get_item("SOPInstanceUID")
    pixels = ds.get_item("PixelData", keep_deferred=True)
    # (SpecificCharacterSet is converted as it is read: no offsets; the 4th element is raw)
    fourth = sorted(ds.keys())[3]
    fourth_start = ds.get_item(fourth, keep_deferred=True).value_tell - 8  # explicit VR, short form
    cut = {
        "inside the SOPInstanceUID's value": sop.value_tell + sop.length - 3,
        "inside the Pixel Data element's header": pixels.value_tell - 6,
        "two bytes into an element header": fourth_start + 2,
        "inside the pixel data": pixels.value_tell + 100,
    }[where]
    target = tmp_path / "cut.dcm"
    target.write_bytes(data[:cut])
    with pytest.raises((InvalidDicom, PixelDataError)) as caught:
        dicom.read_header(target)
    assert reason in str(caught.value)
    if reason != "Pixel Data is":
        assert str(caught.value).startswith("file is truncated: ")
    dicom.read_header(_write(tmp_path / "whole.dcm", data))  # the whole file reads
    dicom.read_header(_write(tmp_path / "padded.dcm", data + b"\0\0\0"))  # and NUL padding after it


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_a_number_outside_the_integer_range_is_dropped(dicom_files: Path, tmp_path: Path):
    """IS values hold 32-bit integers; a larger SeriesNumber is not a reason to refuse
    the image, and must not reach a PostgreSQL integer column."""
    path = _write(tmp_path / "big.dcm", _fresh_ct(dicom_files, SeriesNumber="99999999999", InstanceNumber="7"))
    _, header = dicom.read_header(path)
    assert header.series_number is None and header.instance_number == 7
    path = _write(tmp_path / "frames.dcm", _fresh_ct(dicom_files, NumberOfFrames="99999999999"))
    with pytest.raises(InvalidDicom, match=r"NumberOfFrames \(0028,0008\) is out of range: 99999999999"):
        dicom.read_header(path)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"BitsAllocated": 12}, "BitsAllocated (0028,0100) must be 1 or a multiple of 8, got 12"),
        ({"BitsStored": 32}, "BitsStored (0028,0101) must be between 1 and BitsAllocated (16), got 32"),
        ({"PhotometricInterpretation": "MONOCHROME3"}, "PhotometricInterpretation (0028,0004) 'MONOCHROME3' is not"),
        ({"RescaleSlope": ("LO", "zz")}, "RescaleSlope (0028,1053) is not a number: 'zz'"),
    ],
)
def test_a_pixel_module_nothing_could_render_is_refused(dicom_files: Path, tmp_path: Path, changes, reason):
    """Uncompressed pixel data of the right length, described by values no renderer
    can use: refused at ingest, rather than stored and failing every preview."""
    path = _write(tmp_path / "odd.dcm", _fresh_ct(dicom_files, **changes))
    with pytest.raises(PixelDataError) as caught:
        dicom.read_header(path)
    assert reason in str(caught.value)


def test_an_enhanced_ct_uses_each_frames_rescale_and_window(dicom_files: Path):
    # Enhanced CT keeps its rescale (-1024) and window (49/102) in the functional
    # groups, not at the top level where a classic CT has them.
    path = dicom_files / PD / "eCT_Supplemental.dcm"
    header = dicom.read_dataset(path, stop_before_pixels=True)
    assert "RescaleIntercept" not in header and "WindowCenter" not in header
    stored = pydicom.dcmread(path).pixel_array.astype(np.float32)
    for frame in (1, 2):
        hu = dicom.decode_frame(path, header, frame)
        np.testing.assert_array_equal(hu, stored[frame - 1] - 1024.0)
        rendered = dicom.render(hu, dicom.frame_header(header, frame))
        assert rendered.window == Window(49.0, 102.0)
    # A classic header comes back as it is.
    classic = dicom.read_dataset(dicom_files / TF / "CT_small.dcm", stop_before_pixels=True)
    assert dicom.frame_header(classic, 1) is classic


def _rle_frame_of(side: int, path: Path) -> Path:
    """A Secondary Capture whose one RLE frame declares side × side 8-bit pixels in a
    file a few hundred times smaller (runs of 128 equal bytes)."""
    import struct

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless, SecondaryCaptureImageStorage, generate_uid

    runs, rest = divmod(side * side, 128)
    segment = bytes([0x81, 0x40]) * runs + (bytes([257 - rest, 0x40]) if rest else b"")
    segment += b"\x00" * (len(segment) % 2)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "OT"
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 8, 8, 7, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = encapsulate([struct.pack("<16L", 1, 64, *([0] * 14)) + segment])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_frame_too_large_to_decode_safely_is_refused_before_any_decoding(tmp_path: Path):
    # 10000² values from a 1.6 MB file: decoding and drawing it would take gigabytes.
    bomb = _rle_frame_of(10_000, tmp_path / "bomb.dcm")
    assert bomb.stat().st_size < 2_000_000
    with pytest.raises(PixelDataError, match=r"a frame of 10000×10000×1 values is over the 67,108,864"):
        dicom.read_header(bomb)
    # One stored before the cap is not drawn either.
    with pytest.raises(RenderError, match="over the 67,108,864"):
        dicom.decode_frame(bomb, dicom.read_dataset(bomb, stop_before_pixels=True))
    # The same construction at a size radiographs have is read.
    _, header = dicom.read_header(_rle_frame_of(4096, tmp_path / "fine.dcm"))
    assert (header.rows, header.columns) == (4096, 4096)
