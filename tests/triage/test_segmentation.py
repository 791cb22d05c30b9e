"""The segmenter's pure core: weak masks from real MIAS films, the U-Net, Dice + BCE."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from triage import localisation_metrics, segmentation
from triage.weights import load_model_file, save_model

# mdb001's lesion: centre (535, 599), radius 197, top-left origin (annotations.csv).
MDB001_CIRCLE = (338.0, 402.0, 732.0, 796.0)


@pytest.fixture(scope="module")
def films(datasets: Path) -> dict[str, np.ndarray]:
    out = {}
    for name in ("mdb001", "mdb002", "mdb003", "mdb004"):
        with Image.open(datasets / "mini-mias" / "images" / f"{name}.png") as image:
            out[name] = np.asarray(image.convert("L"))
    return out


def test_otsu_splits_two_populations():
    values = np.concatenate([np.full(500, 0.2), np.full(500, 0.7)])
    assert 0.2 <= segmentation.otsu_threshold(values) < 0.7


def test_largest_component_and_hole_filling():
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:12, 2:12] = True  # 100 pixels, with a hole
    mask[6:8, 6:8] = False
    mask[15:18, 15:18] = True  # 9 pixels, separate
    largest = segmentation.largest_component(mask)
    assert largest.sum() == 96 and not largest[16, 16]
    filled = segmentation.fill_holes(largest)
    assert filled.sum() == 100 and filled[6, 6]


def test_weak_breast_mask_covers_the_breast_not_the_background(films):
    for name, film in films.items():
        mask = segmentation.breast_mask(film)
        assert mask.shape == film.shape and mask.dtype == bool
        assert 0.1 < mask.mean() < 0.7, name
        # The corners opposite the chest wall are film background.
        laterality_left = film[:, :100].mean() < film[:, -100:].mean()
        corner = (slice(0, 50), slice(0, 50)) if laterality_left else (slice(0, 50), slice(-50, None))
        assert not mask[corner].any(), name
    # mdb001's lesion centre lies inside the breast.
    assert segmentation.breast_mask(films["mdb001"])[599, 535]


def test_breast_region_frames_the_breast_and_leaves_the_background(films):
    for name, film in films.items():
        x0, y0, x1, y1 = segmentation.breast_region(film)
        assert 0 <= x0 < x1 <= film.shape[1] and 0 <= y0 < y1 <= film.shape[0], name
        mask = segmentation.breast_mask(film)
        assert mask[y0:y1, x0:x1].sum() >= 0.99 * mask.sum(), name
        # A MIAS film is mostly background beside the breast.
        assert (x1 - x0) * (y1 - y0) < 0.7 * film.size, name
    x0, y0, x1, y1 = segmentation.breast_region(films["mdb001"])
    lx0, ly0, lx1, ly1 = MDB001_CIRCLE
    assert x0 <= lx0 and y0 <= ly0 and lx1 <= x1 and ly1 <= y1  # the lesion's whole circle
    # Nothing breast-like: the whole image.
    assert segmentation.breast_region(np.zeros((300, 200), np.uint8)) == (0, 0, 200, 300)


def test_breast_region_cuts_the_film_edge_and_keeps_every_ddsm_lesion(datasets):
    """The Mini-DDSM scans' bright unexposed film edge touches the breast; the weak
    mask keeps it (its box would be the whole film), the region must not, and it must
    keep each of the 14 outlined lesions whole."""
    from studies.datasets import ddsm

    lesions = 0
    for item in ddsm.read_mini_ddsm(datasets).items:
        film = pydicom.dcmread(io.BytesIO(item.dicom)).pixel_array
        x0, y0, x1, y1 = segmentation.breast_region(film)
        assert (x1 - x0) * (y1 - y0) < 0.9 * film.size, item.name
        for finding in item.findings:
            if finding.box is not None:
                bx0, by0, bx1, by1 = finding.box
                assert x0 <= bx0 and y0 <= by0 and bx1 <= x1 and by1 <= y1, (item.name, finding.box)
                lesions += 1
    assert lesions == 14


def test_weak_breast_mask_agrees_with_expert_tissue_maps(datasets):
    """Against the DDSM normals' hand-drawn tissue maps (every third of the 47 films), the
    weak mask covers the breast and pectoral muscle (everything but film background)
    with Dice ≥ 0.95; at half of Otsu's cut it lost the fatty rim (about 0.94)."""
    root = datasets / "ddsm-normals-tissue"
    with (root / "labels.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))[::3]
    scores = []
    for row in rows:
        with Image.open(root / row["image"]) as image, Image.open(root / row["tissue_mask"]) as tissue:
            film, body = np.asarray(image.convert("L")), np.asarray(tissue) != 64  # 64: background
        scores.append(localisation_metrics.dice(segmentation.breast_mask(film), body))
    assert np.mean(scores) >= 0.95, scores
    assert min(scores) >= 0.85, scores


def test_lesion_mask_is_the_inscribed_circle_clipped_to_the_image():
    mask = segmentation.ellipse_mask((1024, 1024), [MDB001_CIRCLE])
    assert mask.sum() == pytest.approx(np.pi * 197**2, rel=0.01)
    assert mask[599, 535] and not mask[402, 338]  # centre in, box corner out
    # A circle reaching past the right edge: only the part inside the image.
    half = segmentation.ellipse_mask((100, 100), [(80.0, 30.0, 120.0, 70.0)])
    assert half.sum() == pytest.approx(np.pi * 20**2 / 2, rel=0.05)
    assert segmentation.ellipse_mask((10, 10), []).sum() == 0


def test_dice_bce_loss_ignores_unknown_labels():
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 8, 8)
    target = (torch.rand(1, 2, 8, 8) > 0.5).float()
    first_only = segmentation.dice_bce_loss(logits, target, torch.tensor([[1.0, 0.0]]))
    alone = segmentation.dice_bce_loss(logits[:, :1], target[:, :1], torch.tensor([[1.0]]))
    both = segmentation.dice_bce_loss(logits, target, torch.tensor([[1.0, 1.0]]))
    assert float(first_only) == pytest.approx(float(alone))
    assert float(both) != pytest.approx(float(alone))
    perfect = segmentation.dice_bce_loss(target * 40 - 20, target, torch.tensor([[1.0, 1.0]]))
    assert float(perfect) < 0.01


def test_unet_trains_on_weak_masks_and_predicts_full_size_masks(films, tmp_path):
    samples = [
        segmentation.Sample(
            film,
            {
                "breast": segmentation.breast_mask(film),
                "lesion": segmentation.ellipse_mask(film.shape, [MDB001_CIRCLE] if name == "mdb001" else []),
            },
        )
        for name, film in films.items()
    ]
    model, report = segmentation.train(
        samples, input_size=64, widths=(8, 16, 32), epochs=12, batch_size=4, lr=5e-3, progress=False
    )
    assert report.steps == 12 and report.settings["labelled"] == {"breast": 4, "lesion": 4}
    assert report.epoch_losses[-1] < report.epoch_losses[0]

    meta = segmentation.make_meta(segmentation.LABELS, segmentation.model_config(report))
    save_model(tmp_path / "unet.pt", model, meta)
    state, loaded = load_model_file(tmp_path / "unet.pt")
    rebuilt = segmentation.build_from_meta(loaded)
    rebuilt.load_state_dict(state)
    masks = segmentation.predict(rebuilt, loaded, films["mdb002"][:, :768])
    assert set(masks) == {"breast", "lesion"}
    assert all(m.shape == (1024, 768) and m.dtype == bool for m in masks.values())
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 2, 64, 64)


def test_crop_training_keeps_full_image_prediction(films):
    film = films["mdb001"]
    sample = segmentation.Sample(film, {"lesion": segmentation.ellipse_mask(film.shape, [MDB001_CIRCLE])})
    model, report = segmentation.train(
        [sample, sample], ["lesion"], input_size=64, crop=32, widths=(8, 16), epochs=2, batch_size=2, progress=False
    )
    assert report.settings["crop"] == 32 and report.steps == 2
    meta = segmentation.make_meta(["lesion"], segmentation.model_config(report))
    assert segmentation.predict(model, meta, film)["lesion"].shape == film.shape
