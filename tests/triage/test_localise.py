"""Localisation end to end: FROC and Dice on hand-made cases, the active detector and
segmenter run on arrival (rows once per image and model version, mask PNGs with no
orphans), and the evaluation."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from django.db import transaction
from PIL import Image

from studies.models import Cohort, CohortMembership, Finding, Instance
from triage import detection, localisation, segmentation, services
from triage import localisation_metrics as lm
from triage.models import (
    Category,
    Detection,
    ImageQuality,
    LocalisationRun,
    SegmentationMask,
    TriageModelVersion,
    TriageResult,
)

# --- FROC and Dice -------------------------------------------------------------------------


def test_a_hit_is_iou_of_a_tenth_or_the_centre_inside():
    lesion = (8.0, 0.0, 20.0, 10.0)
    assert lm.hits((0.0, 0.0, 10.0, 10.0), lesion)  # IoU 20/200 = 0.1, centre (5, 5) outside
    assert not lm.hits((0.0, 0.0, 10.0, 10.0), (9.0, 0.0, 20.0, 10.0))  # IoU 0.05, centre outside
    assert lm.hits((0.0, 0.0, 400.0, 400.0), (150.0, 150.0, 250.0, 250.0))  # IoU 0.06, centre inside


def test_froc_on_hand_made_cases():
    cases = [
        lm.ImageCase([(0.9, (1, 1, 9, 9)), (0.8, (50, 50, 60, 60)), (0.85, (2, 2, 8, 8))], [(0, 0, 10, 10)]),
        lm.ImageCase([(0.7, (0, 0, 5, 5))], []),  # a normal image: every mark is false
        # Centre (145, 145) outside and IoU 0.03: false. Centre (117.5, 117.5) inside: a hit.
        lm.ImageCase([(0.6, (90, 90, 200, 200)), (0.5, (105, 105, 130, 130))], [(100, 100, 120, 120)]),
    ]
    curve = lm.froc(cases)
    assert curve.lesions == 2 and curve.images == 3
    assert curve.thresholds == [0.9, 0.85, 0.8, 0.7, 0.6, 0.5]
    # The second mark on the first lesion (0.85) is no false mark.
    assert curve.false_marks_per_image == pytest.approx([0, 0, 1 / 3, 2 / 3, 1, 1])
    assert curve.sensitivity == [0.5, 0.5, 0.5, 0.5, 0.5, 1.0]
    assert lm.sensitivity_at(curve, 0.5) == 0.5
    assert lm.sensitivity_at(curve, 1.0) == 1.0
    assert lm.sensitivity_at(curve, 2.0) == 1.0
    assert lm.sensitivity_at(lm.froc([lm.ImageCase([(0.9, (0, 0, 1, 1))], [(5, 5, 9, 9)])]), 0.5) == 0.0


def test_froc_per_lesion_class_counts_that_class_at_the_rate_of_all_marks(tmp_path):
    cases = [
        # A mass found at 0.9, a calcification at 0.4; one false mark at 0.8.
        lm.ImageCase(
            [(0.9, (0, 0, 10, 10)), (0.8, (50, 50, 60, 60)), (0.4, (100, 100, 104, 104))],
            [(0, 0, 10, 10), (100, 100, 105, 105)],
            ["MASS", "CALC"],
        ),
        lm.ImageCase([(0.6, (0, 0, 5, 5))], [(20, 20, 30, 30)], ["CALC"]),  # a missed calcification
    ]
    by_class = lm.froc_by_class(cases)
    assert list(by_class) == ["CALC", "MASS"]
    assert (by_class["MASS"].lesions, by_class["CALC"].lesions) == (1, 2)
    # At 0.5 false marks per image (the 0.8 mark): the mass found, no calcification yet.
    assert lm.sensitivity_at(by_class["MASS"], 0.5) == 1.0 and lm.sensitivity_at(by_class["CALC"], 0.5) == 0.0
    # The mark on the mass is no false mark for the calcification curve either.
    assert by_class["CALC"].false_marks_per_image == lm.froc(cases).false_marks_per_image
    assert lm.sensitivity_at(by_class["CALC"], 1.0) == 0.5
    assert lm.froc(cases, lesion_class="ARCH").lesions == 0
    with pytest.raises(ValueError, match="a class for every lesion"):
        lm.froc([lm.ImageCase([], [(0, 0, 1, 1)])], lesion_class="MASS")
    plain = lm.plot_froc(lm.froc(cases), tmp_path / "plain.png")
    drawn = lm.plot_froc(lm.froc(cases), tmp_path / "by-class.png", by_class=by_class)
    with Image.open(drawn) as image:
        assert image.format == "PNG"
    assert drawn.read_bytes() != plain.read_bytes()  # the class curves and legend are drawn


def test_dice_on_hand_made_masks(tmp_path):
    a = np.zeros((10, 10), dtype=bool)
    b = np.zeros((10, 10), dtype=bool)
    a[:, :5] = True
    b[:, 2:7] = True
    assert lm.dice(a, b) == pytest.approx(2 * 30 / 100)
    assert lm.dice(a, a) == 1.0 and lm.dice(a, ~a) == 0.0
    assert lm.dice(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    png = lm.plot_froc(lm.froc([lm.ImageCase([(0.9, (0, 0, 4, 4))], [(0, 0, 4, 4)])]), tmp_path / "f.png")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 100


# --- running on arrival ------------------------------------------------------------------


def register_tiny_models(tasks=("mammography",)):
    """An untrained detector that always answers (score threshold 0) and a tiny U-Net,
    registered and activated as the trainers would."""
    torch.manual_seed(0)
    config = {"arch": "fcos-resnet18", "input_size": 160, "fpn_channels": 64, "head_convs": 1}
    config.update(score_thresh=0.0, nms_thresh=0.3, detections_per_img=3)
    detector_meta = detection.make_meta(["CIRC"], config, training={"tasks": list(tasks)})
    detector = services.triage_model_register(
        kind="detector", model=detection.build(["CIRC"], **config), meta=detector_meta, activate=True
    )
    seg_config = {"input_size": 64, "widths": [8, 16]}
    seg_meta = segmentation.make_meta(segmentation.LABELS, seg_config, training={"tasks": list(tasks)})
    segmenter = services.triage_model_register(
        kind="segmenter", model=segmentation.build(widths=(8, 16)), meta=seg_meta, activate=True
    )
    return detector, segmenter


@pytest.mark.django_db
def test_localise_study_stores_boxes_and_masks_once_per_image_and_version(mammogram, ingest, settings):
    detector, segmenter = register_tiny_models()
    instance = ingest(mammogram())
    study = instance.series.study

    boxes = list(Detection.objects.filter(instance=instance, model_version=detector))
    assert 1 <= len(boxes) <= 3
    for box in boxes:
        assert box.label == "CIRC" and 0 <= box.x0 < box.x1 <= 1024 and 0 <= box.y0 < box.y1 <= 1024
    masks = {m.label: m for m in SegmentationMask.objects.filter(instance=instance, model_version=segmenter)}
    assert set(masks) == {"breast", "lesion"}
    for mask in masks.values():
        path = Path(settings.PRECEDENT_HOME) / mask.mask_path
        with Image.open(path) as image:
            pixels = np.asarray(image)
        assert image.mode == "L" and pixels.shape == (1024, 1024)
        assert set(np.unique(pixels)) <= {0, 255}
        assert mask.area_fraction == pytest.approx((pixels == 255).mean())
    assert LocalisationRun.objects.filter(instance=instance).count() == 2

    # Triage again (as when another image of the study arrives): nothing runs twice.
    before = (
        sorted(Detection.objects.values_list("pk", flat=True)),
        sorted(SegmentationMask.objects.values_list("pk", flat=True)),
    )
    services.triage_study(study_id=study.pk)
    found = services.localise_study(study=study)
    after = (
        sorted(Detection.objects.values_list("pk", flat=True)),
        sorted(SegmentationMask.objects.values_list("pk", flat=True)),
    )
    assert after == before and LocalisationRun.objects.count() == 2
    assert sorted((d.label, d.score) for d in found) == sorted((b.label, b.score) for b in boxes)
    assert {d.sop_instance_uid for d in found} == {instance.sop_instance_uid}
    mask_files = list((Path(settings.PRECEDENT_HOME) / "masks").rglob("*.png"))
    assert len(mask_files) == 2  # no stray copies from the second triage


@pytest.mark.django_db
def test_deleting_an_image_removes_its_mask_files_once_that_commits(
    mammogram, ingest, settings, django_capture_on_commit_callbacks
):
    register_tiny_models()
    kept, deleted = ingest(mammogram()), ingest(mammogram(patient_id="TRIAGE-2"))
    home = Path(settings.PRECEDENT_HOME)
    paths = {
        name: [home / m.mask_path for m in SegmentationMask.objects.filter(instance=image)]
        for name, image in (("kept", kept), ("deleted", deleted))
    }
    assert all(len(p) == 2 and all(f.is_file() for f in p) for p in paths.values())
    with pytest.raises(RuntimeError), transaction.atomic():  # a rolled-back delete keeps them
        deleted.delete()
        raise RuntimeError
    assert all(f.is_file() for f in paths["deleted"])
    with django_capture_on_commit_callbacks(execute=True):
        Instance.objects.get(sop_instance_uid=deleted.sop_instance_uid).delete()
    assert not any(f.exists() for f in paths["deleted"])
    assert not paths["deleted"][0].parent.exists()  # the image's folder of masks went with its last
    assert all(f.is_file() for f in paths["kept"])


@pytest.mark.django_db
def test_store_check_reconciles_mask_files_with_their_rows(mammogram, ingest, settings):
    """A mask row whose PNG is gone is reported; a PNG no row has (a process killed
    between writing it and storing its row) is removed by --fix once old enough."""
    import io
    import os
    import time

    from django.core.management import CommandError, call_command

    register_tiny_models()
    instance = ingest(mammogram())
    home = Path(settings.PRECEDENT_HOME)
    breast, lesion = SegmentationMask.objects.filter(instance=instance).order_by("label")
    out = io.StringIO()
    call_command("store", "check", stdout=out)
    assert "segmentation masks: 2, files missing: 0" in out.getvalue()

    stray = (home / lesion.mask_path).with_name("lesion-killedwriter.png")
    stray.write_bytes((home / lesion.mask_path).read_bytes())
    (home / breast.mask_path).unlink()
    with pytest.raises(CommandError):
        call_command("store", "check", "--fix", stdout=(out := io.StringIO()))
    assert "segmentation masks: 2, files missing: 1" in out.getvalue()
    assert "mask files no mask has: 1, 0 removed, 1 younger than 60 min left alone" in out.getvalue()
    then = time.time() - 7200
    os.utime(stray, (then, then))
    with pytest.raises(CommandError):  # the missing one is still missing: rows are never touched
        call_command("store", "check", "--fix", stdout=(out := io.StringIO()))
    assert "mask files no mask has: 1, 1 removed" in out.getvalue()
    assert not stray.exists() and (home / lesion.mask_path).exists()
    assert SegmentationMask.objects.filter(instance=instance).count() == 2


@pytest.mark.django_db
def test_detections_reach_the_triage_decision(mammogram, ingest, settings):
    settings.PRECEDENT_TRIAGE_SUSPICIOUS_DETECTION_SCORE = 0.0  # any box of the untrained detector counts
    register_tiny_models()
    instance = ingest(mammogram())
    result = TriageResult.objects.get(study=instance.series.study, is_current=True)
    assert result.category == Category.SUSPICIOUS
    assert any(reason.startswith("detector: CIRC") for reason in result.reasons)


@pytest.mark.django_db
def test_models_run_only_on_the_tasks_they_were_trained_for(mammogram, ingest):
    register_tiny_models(tasks=("chest",))
    instance = ingest(mammogram())
    assert not LocalisationRun.objects.filter(instance=instance).exists()
    assert not Detection.objects.exists() and not SegmentationMask.objects.exists()


@pytest.mark.django_db
def test_a_store_that_fails_leaves_no_mask_file(mammogram, ingest, settings):
    instance = ingest(mammogram())  # no model yet: nothing localised
    _, segmenter = register_tiny_models()
    # Another worker got there first: the unique run row makes this store fail.
    LocalisationRun.objects.create(instance=instance, model_version=segmenter)
    masks = {"breast": np.ones((1024, 1024), dtype=bool), "lesion": np.zeros((1024, 1024), dtype=bool)}
    assert localisation._store_masks(instance, segmenter, masks, 0.1) is False
    assert not SegmentationMask.objects.exists()
    assert not [p for p in (Path(settings.PRECEDENT_HOME) / "masks").rglob("*") if p.is_file()]


@pytest.mark.django_db
def test_evaluate_localisation_reports_froc_and_dice(mammogram, ingest, tmp_path):
    instance = ingest(mammogram())
    Finding.objects.create(
        instance=instance,
        pathology="benign",
        abnormality_class="CIRC",
        x0=338,
        y0=402,
        x1=732,
        y1=796,
        source=Finding.Source.DATASET,
    )
    empty = services.evaluate_localisation(instances=[instance], out_dir=tmp_path)
    assert empty["froc"] is None and empty["dice_mean"] is None and empty["reason"]
    detector, segmenter = register_tiny_models()
    result = services.evaluate_localisation(instances=[instance], out_dir=tmp_path)
    assert set(result["froc"]) == {"0.5", "1", "2"}
    assert all(0.0 <= v <= 1.0 for v in result["froc"].values())
    assert result["lesions"] == 1 and result["images"] == 1
    assert 0.0 <= result["dice_mean"] <= 1.0 and result["dice_images"] == 1
    assert Path(result["froc_png"]).is_file() and result["detector"] == detector.name
    assert 0.0 <= result["breast_dice_mean"] <= 1.0


@pytest.mark.django_db
def test_breast_crop_is_for_cohorts_of_mammograms(mammogram, ingest):
    """The detector crops to the breast when asked to, and refuses to on a cohort
    with chest films; unasked, it sees whole films."""
    cohort = Cohort.objects.create(name="mixed")
    mammo = localisation.cohort_images(cohort, keep_long_side=64, instances=_instances(ingest(mammogram())))
    assert [i.task for i in mammo] == ["mammography"]
    chest = [replace(mammo[0], task="chest")]
    assert localisation._breast_crop(cohort, mammo, True) is True
    assert localisation._breast_crop(cohort, mammo, False) is False
    assert localisation._breast_crop(cohort, mammo + chest, False) is False
    with pytest.raises(ValueError, match="breast cropping is for mammograms, and cohort 'mixed' also holds chest"):
        localisation._breast_crop(cohort, mammo + chest, True)


def _instances(*instances):
    from studies.models import Instance

    return Instance.objects.filter(pk__in=[i.pk for i in instances])


@pytest.mark.django_db
def test_trainers_read_the_cohort_and_register_versions(mammogram, ingest):
    boxed = ingest(mammogram(patient_id="P-1"))
    normal = ingest(mammogram(patient_id="P-2"))
    Finding.objects.create(
        instance=boxed, pathology="benign", abnormality_class="CIRC", x0=338, y0=402, x1=732, y1=796,
        source=Finding.Source.DATASET, attributes={"box_unclipped": [338, 402, 732, 796]},
    )  # fmt: skip
    Finding.objects.create(instance=normal, pathology="normal", source=Finding.Source.DATASET)
    cohort = Cohort.objects.create(name="tiny")
    for instance in (boxed, normal):
        CohortMembership.objects.create(cohort=cohort, study=instance.series.study)
    # As if arrival had not checked them yet (a worker not started): training checks
    # them itself, so the model still records the task it may run on.
    ImageQuality.objects.filter(instance__in=[boxed, normal]).delete()

    detector = services.train_detector(
        cohort=cohort, epochs=1, progress=False, input_size=160, crop=None, batch_size=2, fpn_channels=64
    )
    assert detector.kind == TriageModelVersion.Kind.DETECTOR and detector.status == TriageModelVersion.Status.READY
    assert detector.metadata["classes"] == ["CIRC"]
    training = detector.metadata["training"]
    assert training["cohort"] == "tiny" and training["tasks"] == ["mammography"] and "summary" in training
    assert training["settings"]["boxes"] == 1 and training["settings"]["images"] == 2
    assert detector.metadata["preprocessing"]["breast_crop"] is False  # unless asked for

    segmenter = services.train_segmenter(
        cohort=cohort, epochs=1, progress=False, input_size=64, widths=(8, 16), activate=True
    )
    assert segmenter.status == TriageModelVersion.Status.ACTIVE
    assert segmenter.metadata["classes"] == ["breast", "lesion"]
    assert segmenter.metadata["training"]["settings"]["labelled"] == {"breast": 2, "lesion": 2}
    assert services.active_triage_model("segmenter").version == segmenter

    empty = Cohort.objects.create(name="empty")
    with pytest.raises(ValueError, match="no finding with a box"):
        services.train_detector(cohort=empty, progress=False)
