"""Overlays: the pure drawing code, the overlays API (auth, 404, content) and the mask
PNG view; and the viewer page carrying the overlays URL and toggles."""

from __future__ import annotations

import io

import numpy as np
import pytest
from django.urls import reverse
from PIL import Image
from rest_framework.test import APIClient

from studies.models import Finding
from triage import overlays
from triage.models import Detection, LocalisationRun, SegmentationMask

from .test_localise import register_tiny_models

# --- pure drawing ----------------------------------------------------------------------------


def test_colours_are_fixed_per_label_and_stable_for_unknown_ones():
    assert overlays.label_colour("lesion") == overlays.PALETTE["lesion"]
    assert overlays.label_colour("CALC") == overlays.label_colour("malignant:calc") == overlays.PALETTE["calc"]
    assert overlays.label_colour("Pneumothorax") == overlays.label_colour("pneumothorax")
    assert overlays.label_colour("Pneumothorax") != overlays.label_colour("Effusion")
    assert overlays.hex_colour((255, 0, 16)) == "#ff0010"


def test_mask_rgba_is_transparent_outside_and_outlined():
    mask = np.zeros((20, 30), dtype=np.uint8)
    mask[5:15, 10:20] = 255
    rgba = overlays.mask_rgba(mask, (10, 20, 30))
    assert rgba.shape == (20, 30, 4) and rgba.dtype == np.uint8
    assert (rgba[mask == 0] == 0).all()
    assert tuple(rgba[10, 15, :3]) == (10, 20, 30)
    assert rgba[10, 15, 3] == round(255 * overlays.FILL_ALPHA)  # inside: semi-transparent
    assert rgba[5, 15, 3] == round(255 * overlays.EDGE_ALPHA)  # the outline: nearly opaque
    assert overlays.mask_edge(mask > 0).sum() == 2 * 10 + 2 * 8
    with pytest.raises(ValueError):
        overlays.mask_rgba(np.zeros((2, 2, 2)), (0, 0, 0))
    decoded = Image.open(io.BytesIO(overlays.encode_png(rgba)))
    assert decoded.mode == "RGBA" and decoded.size == (30, 20)
    assert np.array_equal(np.asarray(decoded), rgba)


# --- the API ---------------------------------------------------------------------------------


@pytest.fixture
def localised(mammogram, ingest):
    """A mammogram scored by the (tiny, untrained) active detector and segmenter, with a
    dataset finding box."""
    detector, segmenter = register_tiny_models()
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
    return instance, detector, segmenter


@pytest.mark.django_db
def test_overlays_list_ground_truth_model_boxes_and_masks(api, localised):
    instance, detector, segmenter = localised
    url = reverse("triage-api:instance-overlays", args=[instance.sop_instance_uid])
    assert url == f"/api/v1/instances/{instance.sop_instance_uid}/overlays/"
    response = api.get(url)
    assert response.status_code == 200, response.content
    data = response.json()
    assert data["sop_instance_uid"] == instance.sop_instance_uid
    assert (data["rows"], data["columns"]) == (1024, 1024)
    truth = [b for b in data["boxes"] if b["source"] == "dataset"]
    assert truth == [
        {
            "x0": 338.0,
            "y0": 402.0,
            "x1": 732.0,
            "y1": 796.0,
            "label": "benign CIRC",
            "class": "CIRC",
            "pathology": "benign",
            "score": None,
            "source": "dataset",
            "colour": truth[0]["colour"],
        }
    ]
    model_boxes = [b for b in data["boxes"] if b["source"] == f"model:{detector.name}"]
    stored = Detection.objects.filter(instance=instance).order_by("-score")
    assert [(b["label"], b["class"], b["score"]) for b in model_boxes] == [(d.label, d.label, d.score) for d in stored]
    assert all(b["pathology"] == "" for b in model_boxes)
    assert all(b["colour"].startswith("#") for b in model_boxes)
    assert {(m["label"], m["class"]) for m in data["masks"]} == {("breast", "breast"), ("lesion", "lesion")}
    assert all(m["source"] == f"model:{segmenter.name}" for m in data["masks"])

    # min_score filters the model's boxes only.
    top = max(d.score for d in stored)
    filtered = api.get(url, {"min_score": top}).json()["boxes"]
    assert [b["score"] for b in filtered if b["score"] is not None] == [top]
    assert api.get(url, {"min_score": 2}).status_code == 400


@pytest.mark.django_db
def test_overlays_need_a_login_and_a_known_instance(api, localised):
    instance, _, _ = localised
    url = reverse("triage-api:instance-overlays", args=[instance.sop_instance_uid])
    assert APIClient().get(url).status_code in (401, 403)
    missing = api.get(reverse("triage-api:instance-overlays", args=["1.2.3.4"]))
    assert missing.status_code == 404 and "1.2.3.4" in missing.json()["error"]


@pytest.mark.django_db
def test_the_mask_png_is_an_rgba_overlay_of_the_image_size(api, localised):
    instance, _, _ = localised
    masks = api.get(reverse("triage-api:instance-overlays", args=[instance.sop_instance_uid])).json()["masks"]
    breast = next(m for m in masks if m["label"] == "breast")
    response = api.get(breast["url"], HTTP_ACCEPT="image/png,image/*")
    assert response.status_code == 200 and response["Content-Type"] == "image/png"
    image = Image.open(io.BytesIO(b"".join(response.streaming_content) if response.streaming else response.content))
    assert image.mode == "RGBA" and image.size == (1024, 1024)
    alpha = np.asarray(image)[..., 3]
    row = SegmentationMask.objects.get(label="breast", instance=instance)
    assert (alpha > 0).mean() == pytest.approx(row.area_fraction, abs=1e-6)
    assert set(np.unique(alpha)) <= {0, round(255 * overlays.FILL_ALPHA), round(255 * overlays.EDGE_ALPHA)}

    other = reverse("triage-api:instance-mask", args=["1.2.3.4", row.pk])
    assert api.get(other).status_code == 404
    assert APIClient().get(breast["url"]).status_code in (401, 403)


@pytest.mark.django_db
def test_retired_models_marks_stay_until_the_new_model_has_run(api, localised):
    instance, detector, _ = localised
    detector.status = "retired"
    detector.save(update_fields=["status"])
    data = api.get(reverse("triage-api:instance-overlays", args=[instance.sop_instance_uid])).json()
    assert any(b["source"] == f"model:{detector.name}" for b in data["boxes"])
    assert LocalisationRun.objects.filter(instance=instance, model_version=detector).exists()


@pytest.mark.django_db
def test_the_viewer_asks_the_overlays_api(browser_client, localised):
    instance, _, _ = localised
    study = instance.series.study
    page = browser_client.get(
        reverse("studies:viewer", args=[study.study_instance_uid, instance.sop_instance_uid]), HTTP_HX_REQUEST="true"
    )
    assert page.status_code == 200
    html = page.content.decode()
    assert f'data-overlays-url="/api/v1/instances/{instance.sop_instance_uid}/overlays/"' in html
    assert "data-detections-toggle" in html and "data-masks-toggle" in html and "data-detections" in html


@pytest.mark.django_db
def test_a_malformed_mask_id_is_a_json_404(api, localised):
    instance, _, _ = localised
    for mask_id in ("-5", "abc", "9" * 30):
        response = api.get(f"/api/v1/instances/{instance.sop_instance_uid}/masks/{mask_id}.png")
        assert response.status_code == 404 and "error" in response.json()
