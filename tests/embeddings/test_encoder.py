"""Encoders, preprocessing and weights files (pure torch; tiny inputs to stay fast)."""

from __future__ import annotations

# faiss before torch: the whole suite runs in one process, and two OpenMP runtimes
# loaded the other way round can crash it (DESIGN).
import faiss  # noqa: F401
import numpy as np
import pytest
import torch
import torchvision

from embeddings.encoder import (
    ARCHITECTURES,
    Encoder,
    EncoderFileError,
    Preprocessing,
    TrainingMeta,
    build_encoder,
    embed_batch,
    init_from_torchvision,
    load_encoder,
    pick_device,
    prepare,
    preprocess,
    save_encoder,
    set_threads,
)

SMALL = Preprocessing(input_size=64)


def noisy(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Tissue-like modality values in 1000..2000."""
    return np.random.default_rng(seed).uniform(1000, 2000, size=(rows, cols)).astype(np.float32)


def batch(count: int = 2, prep: Preprocessing = SMALL) -> torch.Tensor:
    return torch.stack([preprocess(noisy(80, 60, seed=i), prep) for i in range(count)])


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_gives_unit_vectors(arch):
    model = build_encoder(arch, dim=32, preprocessing=SMALL)
    vectors = embed_batch(model, batch(), "cpu", bf16=False)
    assert vectors.shape == (2, 32) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert model.dim == 32 and model.preprocessing == SMALL


@pytest.mark.parametrize(("arch", "stem"), [("resnet18", "conv1"), ("resnet50", "conv1"), ("densenet121", "conv0")])
def test_stem_takes_one_channel(arch, stem):
    model = build_encoder(arch, dim=8)
    conv = model.backbone.conv1 if stem == "conv1" else model.backbone.features.conv0
    assert conv.in_channels == 1


def test_raw_pixels_is_fixed_and_bounded():
    a, b = build_encoder("raw-pixels", dim=64), build_encoder("raw-pixels", dim=64)
    x = batch(prep=Preprocessing())
    np.testing.assert_array_equal(embed_batch(a, x, "cpu"), embed_batch(b, x, "cpu"))
    with pytest.raises(ValueError, match="at most 1024"):
        build_encoder("raw-pixels", dim=2048)
    with pytest.raises(ValueError, match="unknown architecture"):
        build_encoder("vit-huge")


def test_padding_keeps_the_aspect_ratio():
    image = noisy(100, 50)  # tall: padded left and right
    pixels = prepare(image, SMALL)[0]
    assert pixels.shape == (64, 64)
    pad = pixels[:, :16], pixels[:, 48:]
    assert all(bool((p == 0).all()) for p in pad)
    assert bool((pixels[:, 16:48].mean(dim=0) > 0.2).all())  # the image fills exactly the middle 32 columns
    normalised = preprocess(image, SMALL)
    assert normalised.shape == (1, 64, 64)
    assert float(normalised[0, 0, 0]) == pytest.approx(-SMALL.mean / SMALL.std)


def test_box_crop_selects_the_region():
    image = noisy(200, 200) * 0.1  # dim background, 100..200
    image[120:140, 30:50] = 5000.0  # inside the box
    image[20:60, 140:180] = 5000.0  # elsewhere: must not appear in the crop
    pixels = prepare(image, SMALL, box=(30, 120, 50, 140))[0]
    # 15 % margin: the 20-px square sits in the middle 20 of 26 px → 64 × 20/26 ≈ 49 px.
    centre = pixels[12:52, 12:52]
    assert float(centre.min()) > 0.95
    corners = torch.stack([pixels[:4, :4], pixels[:4, -4:], pixels[-4:, :4], pixels[-4:, -4:]])
    assert float(corners.max()) < 0.5
    whole = prepare(image, SMALL)[0]
    assert float(whole.mean()) < float(pixels.mean())  # the crop is mostly the bright square


def test_box_must_have_area_and_overlap_the_image():
    image = noisy(50, 50)
    with pytest.raises(ValueError, match="no area"):
        preprocess(image, SMALL, box=(10, 10, 10, 20))
    with pytest.raises(ValueError, match="outside"):
        preprocess(image, SMALL, box=(60, 0, 80, 10))
    clamped = preprocess(image, SMALL, box=(40, 40, 90, 90))  # partly outside: clamped
    assert clamped.shape == (1, 64, 64)


def test_monochrome1_and_colour_inputs():
    image = noisy(64, 64)
    plain = prepare(image, SMALL)
    torch.testing.assert_close(prepare(image, SMALL, monochrome1=True), 1.0 - plain)
    grey8 = np.random.default_rng(1).integers(0, 256, size=(64, 64), dtype=np.uint8)
    colour = np.repeat(grey8[..., None], 3, axis=2)
    torch.testing.assert_close(preprocess(colour, SMALL), preprocess(grey8, SMALL), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="grey"):
        preprocess(np.zeros((2, 3, 4, 5)), SMALL)


def test_bf16_embeddings_stay_close_to_fp32():
    model = build_encoder("resnet18", dim=64, preprocessing=SMALL)
    x = batch(4)
    fp32 = embed_batch(model, x, "cpu", bf16=False)
    bf16 = embed_batch(model, x, "cpu", bf16=True)
    assert (fp32 * bf16).sum(axis=1).min() > 0.99
    # A list of 1×S×S tensors works as well as one stacked tensor.
    np.testing.assert_array_equal(embed_batch(model, list(x), "cpu", bf16=False), fp32)
    assert embed_batch(model, [], "cpu").shape == (0, 64)


def test_save_load_round_trip(tmp_path):
    model = build_encoder("resnet18", dim=16, preprocessing=SMALL)
    torch.nn.init.normal_(model.projection.weight)  # anything but the default init
    meta = TrainingMeta(cohort="mias-train", epochs=3, loss_history=[4.1, 3.5, 3.2], metrics={"p_at_5": 0.61})
    path = tmp_path / "weights" / "encoder.pt"
    saved = save_encoder(path, model, meta)
    loaded, info = load_encoder(path)
    assert not loaded.training
    x = batch()
    np.testing.assert_array_equal(embed_batch(model, x, "cpu", bf16=False), embed_batch(loaded, x, "cpu", bf16=False))
    assert info == saved
    assert (info.architecture, info.dim, info.preprocessing) == ("resnet18", 16, SMALL)
    assert info.training.cohort == "mias-train" and info.training.loss_history == [4.1, 3.5, 3.2]
    assert info.training.trained_at and info.torch_version == torch.__version__
    assert len(info.state_sha256) == 64
    assert [p.name for p in path.parent.iterdir()] == ["encoder.pt"]  # no temp file left behind


def test_foreign_or_damaged_files_are_refused(tmp_path):
    plain = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), plain)
    with pytest.raises(EncoderFileError, match="not a Precedent encoder file.*plain state_dict"):
        load_encoder(plain)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(EncoderFileError, match="not a readable torch weights file"):
        load_encoder(text)

    path = tmp_path / "encoder.pt"
    save_encoder(path, build_encoder("raw-pixels", dim=8))
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, path)
    with pytest.raises(EncoderFileError, match="format 99"):
        load_encoder(path)
    payload["format_version"] = 1
    payload["state_dict"]["basis"][0, 0] += 1.0
    torch.save(payload, path)
    with pytest.raises(EncoderFileError, match="checksum"):
        load_encoder(path)


def test_init_from_torchvision_checkpoint(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(reference.state_dict(), path)
    model = build_encoder("resnet18", dim=16)
    assert isinstance(model, Encoder)
    report = init_from_torchvision(model, path)
    assert report.adapted == ["conv1.weight"]
    assert report.missing == []
    assert {"fc.weight", "fc.bias"} <= set(report.skipped)
    assert "layer4.1.bn2.running_var" in report.loaded
    torch.testing.assert_close(model.backbone.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(model.backbone.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)

    wrapped = tmp_path / "wrapped.pth"  # as training scripts often save them, from DataParallel
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, wrapped)
    assert init_from_torchvision(build_encoder("resnet18", dim=16), wrapped).missing == []

    with pytest.raises(EncoderFileError, match="does not fit densenet121"):
        init_from_torchvision(build_encoder("densenet121", dim=16), path)


def test_device_and_threads(monkeypatch):
    previous = torch.get_num_threads()
    try:
        assert pick_device().type in {"cpu", "cuda"}
        assert pick_device("cpu").type == "cpu"
        monkeypatch.setenv("PRECEDENT_TORCH_THREADS", "1")
        assert set_threads() == 1 and torch.get_num_threads() == 1
        with pytest.raises(ValueError):
            set_threads(0)
    finally:
        torch.set_num_threads(previous)
