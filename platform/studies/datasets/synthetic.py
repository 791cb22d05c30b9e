"""Synthetic screening cohort: phantoms.py images as Digital Mammography DICOM + findings.

Patients are named SYNTHETIC^PHANTOM-0001 so every page can mark them as synthetic
(`Patient.is_synthetic`). The seed is part of the IssuerOfPatientID and the UIDs, so
cohorts drawn with different seeds never mix, while the same seed and patient number
always give the same bytes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

from .base import (
    DIGITAL_MAMMOGRAPHY_FOR_PRESENTATION,
    NORMAL,
    Conversion,
    FindingSpec,
    Item,
    dataset_uid,
    encode,
    image_dataset,
)
from .phantoms import Phantom, PhantomPatient, screening_cohort

NAME = "synthetic"
DEFAULT_PATIENTS = 25
DEFAULT_SEED = 0
PIXEL_SPACING_MM = 0.2
FIRST_STUDY = dt.date(2024, 1, 2)
# PS3.3 C.8.11.1: the row/column directions of each standard mammographic view as
# hung (left breast: chest wall on the left; right breast mirrored).
PATIENT_ORIENTATION = {
    ("L", "CC"): ["A", "R"],
    ("R", "CC"): ["P", "L"],
    ("L", "MLO"): ["A", "FR"],
    ("R", "MLO"): ["P", "FL"],
}


def read(*, patients: int = DEFAULT_PATIENTS, seed: int = DEFAULT_SEED, limit: int | None = None) -> Conversion:
    """`patients` × 4 views, drawn lazily; `limit` caps the number of images."""
    total = patients * 4 if limit is None else min(limit, patients * 4)
    return Conversion(
        dataset=NAME,
        description=f"SYNTHETIC screening mammogram phantoms (seed {seed}): not patient data",
        total=total,
        items=_items(patients, seed, total),
    )


def _items(patients: int, seed: int, total: int) -> Iterator[Item]:
    count = 0
    for patient in screening_cohort(patients, seed):
        for series_number, image in enumerate(patient.images, start=1):
            if count == total:
                return
            count += 1
            yield _item(patient, image, series_number, seed)


def _item(patient: PhantomPatient, image: Phantom, series_number: int, seed: int) -> Item:
    patient_id = f"SYN-{patient.index:04d}"
    view_name = f"{image.laterality}{image.view}"
    key = f"{NAME}:s{seed}:{patient_id}:{view_name}"
    findings = [
        FindingSpec(
            source_key=f"{key}:lesion-{lesion.key}",
            pathology=lesion.pathology,
            abnormality_class=lesion.kind,
            box=tuple(float(v) for v in lesion.box),
            attributes={"shape": lesion.shape, "size_px": round(lesion.size_px, 1), "breast_density": image.density},
        )
        for lesion in image.lesions
    ] or [FindingSpec(source_key=f"{key}:normal", pathology=NORMAL, attributes={"breast_density": image.density})]

    study_date = FIRST_STUDY + dt.timedelta(days=(patient.index * 3) % 360)
    birth_date = study_date.replace(year=study_date.year - patient.plan.age, day=1)
    center, width = image.window
    ds = image_dataset(
        image.pixels,
        sop_class_uid=DIGITAL_MAMMOGRAPHY_FOR_PRESENTATION,
        sop_instance_uid=dataset_uid(NAME, seed, patient_id, view_name),
        study_instance_uid=dataset_uid(NAME, seed, patient_id, "study"),
        series_instance_uid=dataset_uid(NAME, seed, patient_id, view_name, "series"),
        bits_stored=12,
        PatientID=patient_id,
        IssuerOfPatientID=f"PRECEDENT-SYNTHETIC-S{seed}",
        PatientName=f"SYNTHETIC^PHANTOM-{patient.index:04d}",
        PatientSex="F",
        PatientBirthDate=birth_date.strftime("%Y%m%d"),
        PatientAge=f"{patient.plan.age:03d}Y",
        StudyDate=study_date.strftime("%Y%m%d"),
        StudyTime=f"{8 + patient.index % 9:02d}{patient.index * 7 % 60:02d}00",
        StudyID=str(patient.index),
        AccessionNumber=f"SYN-S{seed}-{patient.index:04d}",
        ReferringPhysicianName="",
        StudyDescription="SYNTHETIC screening mammogram phantom",
        InstitutionName="SYNTHETIC",
        Manufacturer="Precedent",
        ManufacturerModelName="synthetic phantom",
        Modality="MG",
        SeriesNumber=series_number,
        SeriesDescription=f"SYNTHETIC {image.laterality} {image.view}",
        InstanceNumber=1,
        ImageType=["DERIVED", "PRIMARY"],
        PresentationIntentType="FOR PRESENTATION",
        PositionerType="MAMMOGRAPHIC",
        BodyPartExamined="BREAST",
        ImageLaterality=image.laterality,
        ViewPosition=image.view,
        PatientOrientation=PATIENT_ORIENTATION[(image.laterality, image.view)],
        BreastImplantPresent="NO",
        BurnedInAnnotation="NO",
        ContentDate=study_date.strftime("%Y%m%d"),
        ImagerPixelSpacing=[PIXEL_SPACING_MM, PIXEL_SPACING_MM],
        PixelSpacing=[PIXEL_SPACING_MM, PIXEL_SPACING_MM],
        PixelIntensityRelationship="LOG",
        PixelIntensityRelationshipSign=1,
        RescaleIntercept=0,
        RescaleSlope=1,
        RescaleType="US",
        WindowCenter=center,
        WindowWidth=width,
    )
    return Item(name=f"{patient_id} {image.laterality} {image.view}", dicom=encode(ds), findings=findings)
