"""The detector's pure core on real MIAS films: one-channel FCOS, its coordinate frame,
a tiny training run, and the weights file round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from triage import detection, segmentation
from triage.weights import load_model_file, save_model

# mdb001: one benign circumscribed mass, centre (535, 599) radius 197 (top-left origin);
# mdb002: one at (522, 744) radius 69 (annotations.csv).
LESIONS = {"mdb001": (338.0, 402.0, 732.0, 796.0), "mdb002": (453.0, 675.0, 591.0, 813.0)}


@pytest.fixture(scope="module")
def films(datasets: Path) -> dict[str, np.ndarray]:
    out = {}
    for name in ("mdb001", "mdb002", "mdb003"):
        with Image.open(datasets / "mini-mias" / "images" / f"{name}.png") as image:
            out[name] = np.asarray(image.convert("L"))
    return out


def test_prepare_keeps_aspect_and_reports_the_scale(films):
    film = films["mdb001"]
    tensor, framing = detection.prepare(film, 128)
    assert tensor.shape == (1, 128, 128) and framing == detection.Framing(pytest.approx(0.125), 0, 0)
    assert 0.0 <= float(tensor.min()) and float(tensor.max()) <= 1.0
    wide, framing = detection.prepare(film[:, :512], 128)  # 1024 rows × 512 columns
    assert wide.shape == (1, 128, 64) and framing.scale == pytest.approx(0.125)
    inverted, _ = detection.prepare(film, 128, monochrome1=True)
    assert torch.allclose(inverted, 1.0 - tensor)


def test_breast_crop_frames_the_film_by_its_breast_and_boxes_map_both_ways(films):
    film = films["mdb001"]
    x0, y0, x1, y1 = segmentation.breast_region(film)
    tensor, framing = detection.prepare(film, 128, breast_crop=True)
    assert (framing.x0, framing.y0) == (x0, y0)
    assert framing.scale == pytest.approx(128 / max(x1 - x0, y1 - y0))
    assert tensor.shape == (1, round((y1 - y0) * framing.scale), round((x1 - x0) * framing.scale))
    # The crop is windowed on its own: still the full 0..1 range.
    assert float(tensor.min()) == 0.0 and float(tensor.max()) == 1.0
    lesion = torch.tensor([LESIONS["mdb001"]])
    on_input = framing.to_input(lesion)
    assert float(on_input[0, 0]) == pytest.approx((LESIONS["mdb001"][0] - x0) * framing.scale)
    torch.testing.assert_close(framing.to_image(on_input), lesion)


def test_a_breast_crop_detector_marks_only_the_breast_region_in_whole_film_pixels(films):
    """A film inside a wide black margin: the detector sees the breast's crop only, so
    every mark lies inside the region, and its boxes are the network's boxes on the
    crop moved back by the crop's corner."""
    torch.manual_seed(0)
    config = {
        "arch": "fcos-resnet18", "input_size": 128, "score_thresh": 0.0, "detections_per_img": 5, "breast_crop": True,
    }  # fmt: skip
    model = detection.build(["CIRC"], **{k: v for k, v in config.items() if k != "breast_crop"}).eval()
    meta = _meta(config)
    assert meta.preprocessing["breast_crop"] is True
    framed = np.zeros((1024 + 200, 1024 + 300), np.uint8)
    framed[200:, 300:] = films["mdb001"]
    x0, y0, x1, y1 = segmentation.breast_region(framed)
    assert x0 >= 300 and y0 >= 150
    found = detection.detect(model, meta, framed)
    assert found
    for box in found:
        assert x0 <= box.x0 < box.x1 <= x1 and y0 <= box.y0 < box.y1 <= y1
    tensor, framing = detection.prepare(framed, 128, breast_crop=True)
    with torch.no_grad():
        best = model([tensor])[0]["boxes"][:1]
    np.testing.assert_allclose(found[0].box, framing.to_image(best)[0].numpy(), atol=1e-3)


def test_the_detector_takes_one_grey_channel():
    model = detection.build(["CIRC", "CALC"], input_size=128)
    assert model.backbone.body.conv1.in_channels == 1
    assert list(model.transform.image_mean) == [detection.MEAN]
    with pytest.raises(ValueError, match="unknown detector architecture"):
        detection.build(["CIRC"], arch="fcos-vgg")
    with pytest.raises(ValueError, match="at least one class"):
        detection.build([])


def _meta(model_config: dict, classes=("CIRC",)):
    return detection.make_meta(list(classes), model_config)


def test_boxes_come_back_in_the_pixels_of_the_image_given(films):
    """The same film at full size and at half size gives the network the same input,
    so the boxes must differ by exactly the factor 2: the scaling back is right."""
    torch.manual_seed(0)
    config = {"arch": "fcos-resnet18", "input_size": 128, "score_thresh": 0.0, "detections_per_img": 5}
    model = detection.build(["CIRC"], **config).eval()
    meta = _meta(config)
    film = films["mdb001"]
    half = np.asarray(Image.fromarray(film).resize((512, 512), Image.BILINEAR))
    full_boxes = detection.detect(model, meta, film)
    half_boxes = detection.detect(model, meta, half)
    assert full_boxes and len(full_boxes) == len(half_boxes)
    for a, b in zip(full_boxes, half_boxes, strict=True):
        assert a.label == "CIRC" and 0.0 <= a.score <= 1.0
        assert 0 <= a.x0 < a.x1 <= 1024 and 0 <= a.y0 < a.y1 <= 1024
        np.testing.assert_allclose(a.box, np.array(b.box) * 2, atol=12)


def test_a_short_training_run_lowers_the_loss_and_round_trips_through_the_weights_file(films, tmp_path):
    samples = [
        detection.Sample(films["mdb001"], [LESIONS["mdb001"]], [0]),
        detection.Sample(films["mdb002"], [LESIONS["mdb002"]], [0]),
        detection.Sample(films["mdb003"]),  # a normal film: background only
    ]
    model, report = detection.train(
        samples,
        ["CIRC"],
        input_size=128,
        epochs=6,
        batch_size=3,
        negatives_per_positive=1.0,
        lr=1e-3,
        augment=False,
        progress=False,
        fpn_channels=64,
    )
    assert report.steps == 6 and report.settings["boxes"] == 2 and report.settings["positive_images"] == 2
    assert report.epoch_losses[-1] < report.epoch_losses[0]

    meta = detection.make_meta(["CIRC"], detection.model_config(report))
    path = tmp_path / "detector.pt"
    save_model(path, model, meta)
    state, loaded_meta = load_model_file(path)
    rebuilt = detection.build_from_meta(loaded_meta)
    rebuilt.load_state_dict(state)
    rebuilt.eval()
    assert loaded_meta.kind == "detector" and loaded_meta.preprocessing["long_side"] == 128
    original = detection.detect(model, meta, films["mdb001"])
    again = detection.detect(rebuilt, loaded_meta, films["mdb001"])
    assert original
    np.testing.assert_allclose([b.box for b in original], [b.box for b in again], atol=1e-3)


def test_the_trunk_starts_from_an_encoder_a_classifier_a_detector_or_torchvision_weights(tmp_path):
    import torchvision

    from embeddings import encoder as enc
    from triage import classifier
    from triage.weights import ModelFileError, init_trunk

    def trunk_of(model):
        return model.backbone.body

    torch.manual_seed(1)
    encoder = enc.build_encoder("resnet18", dim=32)
    enc.save_encoder(tmp_path / "encoder.pt", encoder)
    cls = classifier.build_classifier("resnet18")
    save_model(tmp_path / "classifier.pt", cls, classifier.classifier_meta(cls))
    source_detector = detection.build(["CIRC"], input_size=128, fpn_channels=64)
    save_model(tmp_path / "detector.pt", source_detector, detection.make_meta(["CIRC"], {"input_size": 128}))
    sources = {
        "encoder.pt": encoder.backbone.layer3[0].conv1.weight,
        "classifier.pt": cls.backbone.layer3[0].conv1.weight,
        "detector.pt": trunk_of(source_detector).layer3[0].conv1.weight,
    }
    for name, expected in sources.items():
        model = detection.build(["CIRC"], input_size=128, fpn_channels=64)
        fpn_before = model.backbone.fpn.inner_blocks[0][0].weight.clone()
        report = init_trunk(trunk_of(model), tmp_path / name, architecture="resnet18")
        assert report.loaded == report.total == len(trunk_of(model).state_dict()), name
        assert torch.equal(trunk_of(model).layer3[0].conv1.weight, expected), name
        assert torch.equal(model.backbone.fpn.inner_blocks[0][0].weight, fpn_before)  # the FPN is not the trunk

    rgb = torchvision.models.resnet18(weights=None)
    torch.save(rgb.state_dict(), tmp_path / "rgb.pt")
    model = detection.build(["CIRC"], input_size=128, fpn_channels=64)
    report = init_trunk(trunk_of(model), tmp_path / "rgb.pt", architecture="resnet18")
    assert report.adapted == 1 and report.loaded == report.total
    assert torch.allclose(trunk_of(model).conv1.weight, rgb.conv1.weight.sum(dim=1, keepdim=True))
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "r50.pt")
    with pytest.raises(ModelFileError, match="does not fit resnet18"):
        init_trunk(trunk_of(model), tmp_path / "r50.pt", architecture="resnet18")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ModelFileError, match="junk.pt is not a readable torch weights file"):
        init_trunk(trunk_of(model), tmp_path / "junk.pt", architecture="resnet18")


def test_training_refuses_what_it_cannot_learn_from(films):
    with pytest.raises(ValueError, match="no training image has a box"):
        detection.train([detection.Sample(films["mdb003"])], ["CIRC"], progress=False)
    with pytest.raises(ValueError, match="class index"):
        detection.train([detection.Sample(films["mdb001"], [LESIONS["mdb001"]], [3])], ["CIRC"], progress=False)
    with pytest.raises(ValueError, match="fpn_channels"):
        detection.build(["CIRC"], fpn_channels=32)
