"""The classifier's pure core on real MIAS films: shapes, preprocessing, orientation,
transfer from the search encoder, combination, and a tiny training run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from embeddings import encoder as enc
from tests.triage.classifier_helpers import mias_items
from triage import classifier, training
from triage.classifier import ClassifierPreprocessing, ImageScore


def test_score_map_pooling_and_probabilities_have_the_expected_shapes() -> None:
    torch.manual_seed(0)
    model = classifier.build_classifier("resnet18").eval()
    x = torch.randn(2, 1, 512, 512)
    with torch.no_grad():
        maps = model.score_map(x)
        logits = model(x)
    assert maps.shape == (2, 2, 16, 16)  # stride 32
    assert logits.shape == (2, 2)
    p = classifier.probabilities(logits)
    assert ((p >= 0) & (p <= 1)).all() and (p[:, 1] <= p[:, 0]).all()


def test_lse_pooling_lies_between_mean_and_max() -> None:
    model = classifier.build_classifier("resnet18", lse_r=4.0)
    maps = torch.tensor([[[[0.0, 0.0], [0.0, 8.0]]]])
    pooled = float(model.pool(maps)[0, 0])
    assert 2.0 < pooled < 8.0


def test_input_size_below_512_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 512"):
        ClassifierPreprocessing(input_size=256)


def test_preprocessing_keeps_the_aspect_ratio_and_orients_the_breast(datasets: Path) -> None:
    film = mias_items(datasets, ["mdb001"])[0].pixels
    tall = film[:, 200:712]  # 1024 × 512, the breast on the film's right (mdb001 is a right MLO)
    prep = ClassifierPreprocessing(input_size=512)
    pixels, scale, flipped = classifier.prepare_film(tall, prep)
    assert pixels.shape == (1, 512, 512) and scale == 0.5
    columns_with_content = (pixels[0] > 0).any(dim=0).nonzero()
    width = int(columns_with_content.max() - columns_with_content.min() + 1)
    assert width <= 256 + 1, "a 2:1 film stays 2:1 (padded), not stretched to a square"
    assert pixels.mean() > 0
    # Oriented: more tissue in the left half whatever side the film showed it on.
    half = pixels.shape[-1] // 2
    assert pixels[..., :half].sum() >= pixels[..., half:].sum()
    mirrored, _, flipped_mirror = classifier.prepare_film(np.ascontiguousarray(tall[:, ::-1]), prep)
    assert flipped != flipped_mirror
    assert torch.allclose(pixels, mirrored, atol=1e-5)


def test_box_to_input_follows_the_resize_padding_and_flip() -> None:
    prep = ClassifierPreprocessing(input_size=512)
    # 1024 rows × 512 columns: scale 0.5, 128 px padding left and right.
    assert classifier.box_to_input((0, 0, 512, 1024), (1024, 512), prep, flipped=False) == (128, 0, 384, 512)
    assert classifier.box_to_input((0, 0, 100, 100), (1024, 512), prep, flipped=True) == (334, 0, 384, 50)


def test_combine_takes_the_max_per_breast_and_exam() -> None:
    scores = classifier.combine(
        [
            ImageScore("a", "L", 0.1, 0.01),
            ImageScore("b", "L", 0.7, 0.2),
            ImageScore("c", "R", 0.3, 0.3),
            ImageScore("d", "", 0.2, 0.0),
        ]
    )
    assert scores["breasts"]["L"] == {"p_abnormal": 0.7, "p_malignant": 0.2}
    assert scores["breasts"]["R"] == {"p_abnormal": 0.3, "p_malignant": 0.3}
    assert set(scores["breasts"]) == {"L", "R", "?"}
    assert scores["exam"] == {"p_abnormal": 0.7, "p_malignant": 0.3}
    assert scores["images"]["c"]["laterality"] == "R"


def test_backbone_starts_from_the_search_encoders_weights(tmp_path: Path) -> None:
    torch.manual_seed(1)
    encoder = enc.build_encoder("resnet18", dim=32)
    enc.save_encoder(tmp_path / "encoder.pt", encoder)
    model = classifier.build_classifier("resnet18")
    report = classifier.init_backbone(model, tmp_path / "encoder.pt")
    assert report.loaded == report.total
    assert torch.equal(model.backbone.layer3[0].conv1.weight, encoder.backbone.layer3[0].conv1.weight)
    # An ImageNet-style RGB torchvision checkpoint: the stem is summed to one channel.
    import torchvision

    rgb = torchvision.models.resnet18(weights=None)
    torch.save(rgb.state_dict(), tmp_path / "rgb.pt")
    report = classifier.init_backbone(model, tmp_path / "rgb.pt")
    assert report.adapted == 1
    assert torch.allclose(model.backbone.conv1.weight, rgb.conv1.weight.sum(dim=1, keepdim=True))
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "r50.pt")
    with pytest.raises(ValueError, match="does not fit resnet18"):
        classifier.init_backbone(model, tmp_path / "r50.pt")


def test_a_tiny_training_run_lowers_the_loss_on_real_mias_crops(datasets: Path) -> None:
    torch.set_num_threads(2)
    items = mias_items(datasets, ["mdb001", "mdb003", "mdb005", "mdb006"])
    config = training.ClassifierConfig(patch_size=128, epochs=6, batch_size=4, lr=1e-3, augment=False, seed=0)
    torch.manual_seed(config.seed)
    start = classifier.build_classifier(config.architecture, lse_r=config.lse_r)
    before = training.evaluate_loss(start.train(), items, patch_size=128)  # batch statistics, as trained
    model, report = training.train_classifier(items, config, progress=False)
    after = training.evaluate_loss(model.train(), items, patch_size=128)
    assert len(report.epoch_losses) == 6 and report.device == "cpu"
    assert (report.images, report.abnormal) == (4, 2)
    assert after < before * 0.7, (before, after)
    assert report.epoch_losses[-1] < report.epoch_losses[0]
    scores = classifier.score_images(model, [item.pixels for item in items])
    assert scores.shape == (4, 2) and (scores[:, 1] <= scores[:, 0] + 1e-6).all()


def test_a_time_budget_ends_training_early_at_a_small_learning_rate(datasets: Path) -> None:
    torch.set_num_threads(2)
    items = mias_items(datasets, ["mdb001", "mdb003"])
    config = training.ClassifierConfig(patch_size=64, epochs=10_000, batch_size=2, augment=False, max_seconds=1.0)
    _, report = training.train_classifier(items, config, progress=False)
    assert report.stopped_by_clock and 1 <= len(report.epoch_losses) < 10_000
    assert report.steps == len(report.epoch_losses)  # one batch per epoch of two films
    meta = report.as_meta(cohort="c")
    assert meta["stopped_by_clock"] is True and meta["config"]["max_seconds"] == 1.0
    with pytest.raises(ValueError, match="max_seconds must be positive"):
        training.ClassifierConfig(max_seconds=0)


def test_training_needs_both_classes(datasets: Path) -> None:
    items = mias_items(datasets, ["mdb003", "mdb004"])
    with pytest.raises(ValueError, match="one class only"):
        training.train_classifier(items, training.ClassifierConfig(epochs=1), progress=False)
