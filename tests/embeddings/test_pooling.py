"""Whole-image embeddings of a larger film with its feature map max- or GeM-pooled.

A small real encoder (ResNet-18, random weights, 64 px regions, 128 px films) on real
MIAS films: the plumbing and the invariants, not retrieval quality (that is
`evaluate_retrieval`'s job; see the README's figures).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from django.core.management import call_command
from PIL import Image

from embeddings import encoder as enc
from embeddings import selectors, services
from embeddings.models import Embedding, EncoderVersion
from studies.datasets import mias
from studies.datasets.importer import import_conversion
from studies.models import Finding, Instance

SMALL = enc.Preprocessing(input_size=64)
POOLED = enc.Preprocessing(input_size=64, image_size=128, image_pooling="max")


@pytest.fixture(scope="module")
def film(datasets: Path) -> np.ndarray:
    """A real 1024² MIAS film (mdb001)."""
    with Image.open(datasets / "mini-mias" / "images" / "mdb001.png") as image:
        return np.asarray(image.convert("L")).astype(np.float32)


def tiny(prep: enc.Preprocessing) -> enc.Encoder:
    torch.manual_seed(0)
    return enc.build_encoder("resnet18", dim=32, preprocessing=prep)


def test_files_without_the_pooling_settings_load_and_embed_as_before(tmp_path: Path, film: np.ndarray):
    path = tmp_path / "plain.pt"
    model = tiny(SMALL)
    enc.save_encoder(path, model)
    # What versions before the setting wrote, and still write for whole-image encoders:
    # older readers refuse keys they do not know.
    assert set(torch.load(path, weights_only=True)["preprocessing"]) == {
        "input_size",
        "window_percentiles",
        "mean",
        "std",
        "region_margin",
    }
    loaded, meta = enc.load_encoder(path)
    assert meta.preprocessing == SMALL and meta.preprocessing.image_pooling == "avg"
    tensor = enc.preprocess(film, meta.preprocessing)
    assert tensor.shape == (1, 64, 64)
    assert enc.pooling_for(meta.preprocessing) == "avg"
    vector = enc.embed_batch(loaded, [tensor], "cpu", bf16=False, pooling=enc.pooling_for(meta.preprocessing))
    with torch.no_grad():  # the encoder as it was: torchvision's average pooling, projection, L2
        model.eval()
        before = F.normalize(model.projection(model.backbone(tensor[None])), dim=1).numpy()
    np.testing.assert_allclose(vector, before, atol=1e-5)


def test_pooled_preprocessing_travels_with_the_weights(tmp_path: Path, film: np.ndarray):
    path = tmp_path / "pooled.pt"
    enc.save_encoder(path, tiny(POOLED))
    model, meta = enc.load_encoder(path)
    assert meta.preprocessing == POOLED and model.preprocessing == POOLED
    whole = enc.preprocess(film, POOLED)
    region = enc.preprocess(film, POOLED, (500, 300, 700, 500))
    assert whole.shape == (1, 128, 128) and region.shape == (1, 64, 64)  # regions crop as before
    assert enc.pooling_for(POOLED) == "max" and enc.pooling_for(POOLED, (0, 0, 1, 1)) == "avg"
    vectors = {p: enc.embed_batch(model, [whole], "cpu", bf16=False, pooling=p) for p in enc.POOLINGS}
    for vector in vectors.values():
        assert vector.shape == (1, 32) and vector.dtype == np.float32
        assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5
    assert (vectors["max"] @ vectors["avg"].T).item() < 0.9999  # max pooling is not average pooling
    with pytest.raises(ValueError, match="image_pooling"):
        enc.Preprocessing(image_pooling="median")
    with pytest.raises(enc.EncoderFileError, match="unknown preprocessing"):
        enc.Preprocessing.from_dict({**POOLED.to_dict(), "tile_stride": 128})


def test_max_pooled_embedding_sees_every_part_of_the_breast(film: np.ndarray):
    """A small bright spot anywhere in the breast, at its very edges too, moves the vector:
    the pooled feature map covers the whole film, as overlapping tiles would."""
    model = tiny(POOLED)
    prep = POOLED
    tissue = film > np.percentile(film, 60)
    rows, cols = np.nonzero(tissue)
    extremes = {
        "top": (rows.min(), cols[rows.argmin()]),
        "bottom": (rows.max(), cols[rows.argmax()]),
        "left": (rows[cols.argmin()], cols.min()),
        "right": (rows[cols.argmax()], cols.max()),
    }
    base = enc.embed_batch(model, [enc.preprocess(film, prep)], "cpu", bf16=False, pooling="max")
    with torch.no_grad():
        cells = model.feature_map(enc.preprocess(film, prep)[None]).shape[-2:]
    assert tuple(cells) == (4, 4)  # 128 px / ResNet's stride of 32: the whole film, no crop
    for where, (row, col) in extremes.items():
        spotted = film.copy()
        spotted[max(0, row - 12) : row + 12, max(0, col - 12) : col + 12] = film.max()
        vector = enc.embed_batch(model, [enc.preprocess(spotted, prep)], "cpu", bf16=False, pooling="max")
        assert (vector @ base.T).item() < 1 - 1e-5, f"a spot at the {where} edge of the breast changed nothing"


@pytest.mark.django_db
def test_pooled_version_embeds_queries_like_its_index(tmp_path: Path, datasets: Path, capsys):
    import_conversion(mias.read(datasets / "mini-mias", limit=4), cohort="mias-4", progress=False)
    path = tmp_path / "tiny.pt"
    enc.save_encoder(path, tiny(SMALL))
    plain = services.encoder_register(path=path, name="tiny")

    call_command("encoder", "pool", "tiny", "--pooling", "max", "--image-size", "128")
    pooled = EncoderVersion.objects.get(name="tiny-max128")
    assert pooled.weights_sha256 == plain.weights_sha256  # the same weights, re-registered
    assert pooled.metadata["preprocessing"]["image_pooling"] == "max"
    call_command("encoder", "activate", "tiny-max128", "--wait")
    assert "tiny-max128" in capsys.readouterr().out
    pooled.refresh_from_db()
    assert pooled.status == EncoderVersion.Status.ACTIVE

    images = Instance.objects.filter(series__modality="MG").order_by("pk")
    assert Embedding.objects.filter(encoder=pooled, kind="image").count() == images.count() == 4
    boxes = Finding.objects.filter(instance__in=images, x0__isnull=False)
    assert boxes.exists() and Embedding.objects.filter(encoder=pooled, kind="region").count() == boxes.count()

    model, meta = services.loaded_encoder(pooled)
    for instance in images:
        picture = services.instance_picture(instance, services.representative_frame(instance))
        stored = Embedding.objects.get(encoder=pooled, kind="image", instance=instance).as_array()
        # The index holds max-pooled 128 px films, not the 64 px average the weights were trained with.
        expected = enc.embed_batch(model, [enc.preprocess(picture.pixels, meta.preprocessing)], pooling="max")[0]
        plain_way = enc.embed_batch(model, [enc.preprocess(picture.pixels, SMALL)])[0]
        assert float(stored @ expected) > 0.999 and float(stored @ plain_way) < 0.999
        # An uploaded copy of the film finds itself with a score of 1: it was embedded the same way.
        found = selectors.similar_cases(
            image=picture.pixels, k=1, filters=selectors.SearchFilters(exclude_same_patient=False)
        )
        assert found.hits[0].sop_instance_uid == instance.sop_instance_uid and found.hits[0].score > 0.999
    # A box query still searches crop-based, average-pooled regions and finds its own lesion.
    finding = boxes.first()
    found = selectors.similar_cases(
        instance=finding.instance,
        box=tuple(finding.box),
        k=1,
        filters=selectors.SearchFilters(exclude_same_patient=False),
    )
    assert found.kind == "region" and found.hits[0].score > 0.999
    assert found.hits[0].sop_instance_uid == finding.instance.sop_instance_uid

    with pytest.raises(Exception, match="already embeds images that way"):
        call_command("encoder", "pool", "tiny-max128", "--pooling", "max", "--image-size", "128")
