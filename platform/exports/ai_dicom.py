"""Pure: model outputs on one image → DICOM SR (TID 1500) and DICOM SEG, with highdicom.

No Django here: a pydicom dataset of the source image and plain dataclasses in,
highdicom objects (pydicom Datasets) out. Both objects belong to the source's study
(same patient and study attributes, which highdicom copies from the source), each in
a new series, made by manufacturer "Precedent" with the model version as the
algorithm's version.

Boxes become one planar ROI each (TID 1410) in a TID 1500 Measurement Report: a
POLYLINE closed rectangle in image pixel coordinates (highdicom's column/row
convention, top-left pixel corner at 0,0, so x1/y1 exclusive boxes map exactly), the
finding type and the finding as coded concepts and the score as a numeric measurement.
Masks become one segment each of a BINARY (or FRACTIONAL) Segmentation of the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID

MANUFACTURER = "Precedent"
MANUFACTURER_MODEL = "Precedent triage"
DEVICE_SERIAL = "precedent"
LOCAL_SCHEME = "99PRECEDENT"  # private coding scheme for labels no standard code covers
SR_SERIES_NUMBER = 9901
SEG_SERIES_NUMBER = 9902

# Standard codes for the labels our models use; anything else gets a local code (the
# label itself) so it still round-trips.
_LABEL_CODES: dict[str, hd.sr.CodedConcept] = {
    "mass": hd.sr.CodedConcept("4147007", "SCT", "Mass"),
    "lesion": hd.sr.CodedConcept("52988006", "SCT", "Lesion"),
    "nodule": hd.sr.CodedConcept("27925004", "SCT", "Nodule"),
    "pneumothorax": hd.sr.CodedConcept("36118008", "SCT", "Pneumothorax"),
    "breast": hd.sr.CodedConcept("76752008", "SCT", "Breast"),
}
MODEL_LABEL = hd.sr.CodedConcept("LABEL", LOCAL_SCHEME, "Model label")
SCORE = hd.sr.CodedConcept("SCORE", LOCAL_SCHEME, "Detection score")
UNITLESS = hd.sr.CodedConcept("1", "UCUM", "no units")
FINDING_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure
TISSUE_CATEGORY = codes.SCT.Tissue


class AiDicomError(ValueError):
    """Model output that cannot be encoded against its source image; one-line reason."""


@dataclass(frozen=True)
class Box:
    """A detection on the source image: pixels, top-left origin, x1/y1 exclusive."""

    label: str
    score: float
    x0: float
    y0: float
    x1: float
    y1: float


@dataclass(frozen=True)
class Mask:
    """One label's mask, rows × columns of the source image: bool, or 0..1 floats for
    FRACTIONAL (e.g. a probability map)."""

    label: str
    pixels: np.ndarray


@dataclass(frozen=True)
class Algorithm:
    name: str  # the model version's name, e.g. "mg-detector-fcos-20261201-1"
    family: str = "detector"  # "detector" | "segmenter"
    software_version: str = "1"


def label_code(label: str) -> hd.sr.CodedConcept:
    code = _LABEL_CODES.get(label.lower())
    if code is not None:
        return code
    value = label.strip()[:16] or "unknown"
    return hd.sr.CodedConcept(value.upper().replace(" ", "_"), LOCAL_SCHEME, label.strip() or "unknown")


def _check_image(source: Dataset) -> tuple[int, int]:
    if "PixelData" not in source and "FloatPixelData" not in source:
        raise AiDicomError(f"source {source.SOPInstanceUID} has no pixel data to reference")
    return int(source.Rows), int(source.Columns)


def detections_to_sr(
    source: Dataset,
    boxes: Sequence[Box],
    *,
    algorithm: Algorithm,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 Measurement Report with one planar ROI per box on `source`."""
    if not boxes:
        raise AiDicomError("no detections to report")
    rows, columns = _check_image(source)
    algorithm_id = hd.sr.AlgorithmIdentification(name=algorithm.name, version=algorithm.software_version)
    region_source = hd.sr.SourceImageForRegion.from_source_image(source)
    groups = []
    for number, box in enumerate(boxes, start=1):
        x0, y0 = max(0.0, float(box.x0)), max(0.0, float(box.y0))
        x1, y1 = min(float(columns), float(box.x1)), min(float(rows), float(box.y1))
        if not (x1 > x0 and y1 > y0):
            raise AiDicomError(f"box {number} ({box.x0}, {box.y0}, {box.x1}, {box.y1}) is empty inside the image")
        # A closed polyline (first point repeated) is how TID 1410 draws a rectangle.
        corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)
        label = label_code(box.label)
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{box.label} {number}"),
                referenced_region=hd.sr.ImageRegion(
                    graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=corners, source_image=region_source
                ),
                finding_type=label,
                finding_category=FINDING_CATEGORY,
                algorithm_id=algorithm_id,
                measurements=[
                    hd.sr.Measurement(name=SCORE, value=float(box.score), unit=UNITLESS, algorithm_id=algorithm_id)
                ],
                qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=MODEL_LABEL, value=label)],
            )
        )
    observer = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=hd.UID(), name=algorithm.name, manufacturer_name=MANUFACTURER, model_name=MANUFACTURER_MODEL
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device, observer_identifying_attributes=observer
            )
        ),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion
        if str(source.get("Modality", "")) == "CT"
        else hd.sr.CodedConcept("P5-40010", "SRT", "Mammography")
        if str(source.get("Modality", "")) == "MG"
        else hd.sr.CodedConcept("IMAGING", LOCAL_SCHEME, "Imaging procedure"),
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source],
        content=report,
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
    )
    sr.SeriesDescription = f"AI detections ({algorithm.name})"[:64]
    sr.SoftwareVersions = algorithm.software_version
    sr.ManufacturerModelName = MANUFACTURER_MODEL
    return sr


def masks_to_seg(
    source: Dataset,
    masks: Sequence[Mask],
    *,
    algorithm: Algorithm,
    fractional: bool = False,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.seg.Segmentation:
    """A Segmentation of `source` with one segment per mask (segment numbers 1..n in
    the order given)."""
    if not masks:
        raise AiDicomError("no masks to encode")
    rows, columns = _check_image(source)
    if int(source.get("NumberOfFrames", 1) or 1) != 1:
        raise AiDicomError("only single-frame source images are supported")
    planes = []
    for mask in masks:
        pixels = np.asarray(mask.pixels)
        if pixels.shape != (rows, columns):
            raise AiDicomError(f"mask {mask.label!r} is {pixels.shape}, the image is {(rows, columns)}")
        planes.append(pixels.astype(np.float32) if fractional else pixels > 0)
    stacked = np.stack(planes, axis=-1)[np.newaxis]  # (frames, rows, columns, segments)
    algorithm_sequence = hd.AlgorithmIdentificationSequence(
        name=algorithm.name, family=codes.DCM.ArtificialIntelligence, version=algorithm.software_version
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=mask.label[:64],
            segmented_property_category=TISSUE_CATEGORY if mask.label.lower() == "breast" else FINDING_CATEGORY,
            segmented_property_type=label_code(mask.label),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm_sequence,
        )
        for number, mask in enumerate(masks, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=[source],
        pixel_array=stacked,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL
        if fractional
        else hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER_MODEL,
        software_versions=algorithm.software_version,
        device_serial_number=DEVICE_SERIAL,
        series_description=f"AI segmentation ({algorithm.name})"[:64],
        omit_empty_frames=False,
        **_pixel_measures(source),
    )
    return seg


def _pixel_measures(source: Dataset) -> dict:
    """Projection images (MG, DX, CR) have no Pixel Spacing or plane position; highdicom
    then needs the pixel measures given (Imager Pixel Spacing, else 1 mm as a stand-in
    that states nothing about the patient)."""
    if "PixelSpacing" in source or "SharedFunctionalGroupsSequence" in source:
        return {}
    spacing = source.get("ImagerPixelSpacing") or [1.0, 1.0]
    return {"pixel_measures": hd.PixelMeasuresSequence(pixel_spacing=[float(v) for v in spacing], slice_thickness=1.0)}


def is_ai_dicom(sop_class_uid: str) -> bool:
    """SR and SEG instances (ours or anyone's): not images for triage or embedding."""
    uid = UID(sop_class_uid)
    return uid.name.endswith("SR Storage") or uid == "1.2.840.10008.5.1.4.1.1.66.4"
