"""Synthetic mammogram phantoms: deterministic, truthful boxes, marked SYNTHETIC, ingestible."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from django.core.management import call_command
from PIL import Image

from studies import services
from studies.datasets import phantoms, synthetic
from studies.models import Cohort, Finding, Instance, Patient


def _first_with(kind: str, shape: str | None = None) -> int:
    """The first patient of seed 0 with that kind of lesion (read from the cheap plans)."""
    for index in range(1, 200):
        lesions = [les for side in phantoms.patient_plan(index).lesions.values() for les in side]
        if any(les.kind == kind and shape in (None, les.shape) for les in lesions):
            return index
    raise AssertionError(f"no {kind} {shape or ''} among the first 200 phantom patients")


def test_same_seed_same_pixels_other_seed_other_pixels() -> None:
    a = phantoms.screening_patient(3, seed=7)
    b = phantoms.screening_patient(3, seed=7)
    c = phantoms.screening_patient(3, seed=8)
    for x, y, z in zip(a.images, b.images, c.images, strict=True):
        assert np.array_equal(x.pixels, y.pixels) and x.lesions == y.lesions and x.window == y.window
        assert not np.array_equal(x.pixels, z.pixels)


def test_a_patient_does_not_depend_on_the_cohort_size() -> None:
    second = list(phantoms.screening_cohort(2, seed=2))[1]
    assert np.array_equal(second.images[0].pixels, phantoms.screening_patient(2, seed=2).images[0].pixels)


def test_four_views_12_bit_with_a_window() -> None:
    patient = phantoms.screening_patient(1)
    assert [(im.laterality, im.view) for im in patient.images] == [("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO")]
    for image in patient.images:
        assert image.pixels.dtype == np.uint16 and image.pixels.shape == (phantoms.ROWS, phantoms.COLUMNS)
        assert image.pixels.max() <= phantoms.MAX_VALUE
        center, width = image.window
        assert width > 100 and 0 < center < phantoms.MAX_VALUE


def test_breasts_hang_from_the_chest_wall_and_mlo_shows_the_muscle() -> None:
    right_cc, left_cc, right_mlo, left_mlo = phantoms.screening_patient(4).images
    half = phantoms.COLUMNS // 2
    # Right breasts have the chest wall on the right edge, left breasts on the left.
    assert right_cc.pixels[:, half:].mean() > 2 * right_cc.pixels[:, :half].mean()
    assert left_cc.pixels[:, :half].mean() > 2 * left_cc.pixels[:, half:].mean()
    # The pectoral muscle fills the top corner at the chest wall on MLO, not on CC.
    assert left_mlo.pixels[:40, :40].mean() > 1500
    assert right_mlo.pixels[:40, -40:].mean() > 1500
    assert left_cc.pixels[:40, :40].mean() < 500


def test_most_breasts_are_normal_and_some_have_each_kind_of_lesion() -> None:
    plans = [phantoms.patient_plan(index) for index in range(1, 201)]
    lesions = [les for plan in plans for side in plan.lesions.values() for les in side]
    assert 0.05 * 400 < len(lesions) < 0.3 * 400  # breasts
    assert {les.kind for les in lesions} == {"mass", "calcification"}
    assert {les.pathology for les in lesions} == {"benign", "malignant"}
    assert {plan.density for plan in plans} == set(phantoms.DENSITIES)


def test_each_planned_lesion_is_drawn_in_both_views_of_its_breast() -> None:
    patient = phantoms.screening_patient(_first_with("mass"))
    for image in patient.images:
        planned = patient.plan.lesions[image.laterality]
        assert [(les.key, les.kind, les.pathology) for les in image.lesions] == [
            (les.key, les.kind, les.pathology) for les in planned
        ]


@pytest.mark.parametrize(("kind", "shape"), [("mass", "round"), ("mass", "spiculated"), ("calcification", None)])
def test_truth_boxes_are_exactly_where_the_lesion_was_drawn(kind: str, shape: str | None) -> None:
    """Drawn with and without lesions, the images differ inside the boxes and nowhere else."""
    index = _first_with(kind, shape)
    patient = phantoms.screening_patient(index)
    bare = phantoms.screening_patient(index, with_lesions=False)
    for image, plain in zip(patient.images, bare.images, strict=True):
        diff = image.pixels.astype(np.int32) - plain.pixels.astype(np.int32)
        inside = np.zeros(diff.shape, dtype=bool)
        for lesion in image.lesions:
            x0, y0, x1, y1 = lesion.box
            assert 0 <= x0 < x1 <= phantoms.COLUMNS and 0 <= y0 < y1 <= phantoms.ROWS
            inside[y0:y1, x0:x1] = True
            box = diff[y0:y1, x0:x1]
            # Denser than what it covers, and the box is tight around the lesion.
            assert box.mean() > 20
            assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()
            # Brighter than the tissue just around it, as a reader would see it.
            ring = image.pixels[max(0, y0 - 15) : y1 + 15, max(0, x0 - 15) : x1 + 15].astype(float)
            assert image.pixels[y0:y1, x0:x1].max() > np.percentile(ring, 90)
        assert not diff[~inside].any()


def test_synthetic_dicom_bytes_are_deterministic() -> None:
    one = [item.dicom for item in synthetic.read(patients=1, seed=5).items]
    two = [item.dicom for item in synthetic.read(patients=1, seed=5).items]
    assert len(one) == 4 and one == two
    ds = pydicom.dcmread(io.BytesIO(one[0]))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography, For Presentation
    assert (ds.Modality, ds.PresentationIntentType, ds.BodyPartExamined) == ("MG", "FOR PRESENTATION", "BREAST")
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PhotometricInterpretation) == (16, 12, 11, "MONOCHROME2")
    assert (ds.ImageLaterality, ds.ViewPosition) == ("R", "CC")
    assert float(ds.WindowWidth) > 0
    assert ds.StudyDescription == "SYNTHETIC screening mammogram phantom"


@pytest.mark.django_db
def test_import_synthetic_marks_patients_stores_truth_and_is_idempotent() -> None:
    out = io.StringIO()
    call_command("import_dataset", "synthetic", "--patients", "3", "--seed", "11", stdout=out)
    assert "12 images: 12 stored, 0 duplicate, 0 rejected" in out.getvalue()

    patients = Patient.objects.order_by("patient_id")
    assert list(patients.values_list("patient_id", flat=True)) == ["SYN-0001", "SYN-0002", "SYN-0003"]
    assert all(p.is_synthetic and p.name.startswith("SYNTHETIC^PHANTOM-") for p in patients)
    assert Cohort.objects.get(name="synthetic-screening").studies.count() == 3

    expected = [im for index in (1, 2, 3) for im in phantoms.screening_patient(index, seed=11).images]
    normal = sum(not im.lesions for im in expected)
    lesions = [les for im in expected for les in im.lesions]
    assert Finding.objects.filter(pathology="normal", x0=None).count() == normal
    assert Finding.objects.exclude(pathology="normal").count() == len(lesions)
    assert {(f.abnormality_class, tuple(f.box)) for f in Finding.objects.exclude(pathology="normal")} == {
        (les.kind, tuple(map(float, les.box))) for les in lesions
    }
    assert all(f.source_key.startswith("synthetic:s11:") for f in Finding.objects.all())

    instance = Instance.objects.get(series__study__patient__patient_id="SYN-0001", laterality="L", view_position="MLO")
    assert (instance.bits_stored, instance.columns, instance.rows) == (12, phantoms.COLUMNS, phantoms.ROWS)
    png = services.instance_render_png(instance=instance, request=services.RenderRequest(max_size=256))
    with Image.open(png) as image:
        assert max(image.size) == 256

    again = io.StringIO()
    call_command("import_dataset", "synthetic", "--patients", "3", "--seed", "11", stdout=again)
    assert "12 images: 0 stored, 12 duplicate, 0 rejected; findings: 0 created" in again.getvalue()
