"""Contrastive training on a handful of tiny synthetic mammograms (seconds, CPU)."""

from __future__ import annotations

import math

# faiss before torch: the whole suite runs in one process, and two OpenMP runtimes
# loaded the other way round can crash it (DESIGN).
import faiss  # noqa: F401
import numpy as np
import pytest
import torch

from embeddings.encoder import Preprocessing, build_encoder
from embeddings.training import (
    Augmentation,
    ContrastiveDataset,
    ContrastiveLearner,
    default_num_workers,
    label_indices,
    nt_xent,
    supcon,
    train,
)
from studies.datasets.phantoms import screening_patient

TINY = dict(arch="resnet18", dim=16, input_size=32, epochs=1, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def films() -> list[np.ndarray]:
    """8 phantom views (12-bit values), cut down to 128×100 to keep the cache cheap."""
    views = [view for index in (1, 2) for view in screening_patient(index).images]
    return [view.pixels[::8, ::8] for view in views]


def test_train_self_supervised(films):
    model, report = train(films, None, **TINY)
    assert report.steps == 2 and len(report.epoch_losses) == 1
    assert math.isfinite(report.epoch_losses[0]) and report.epoch_losses[0] > 0
    assert report.supervised_losses == [0.0]
    assert report.images_per_second > 0 and report.device == "cpu"
    assert not model.training and model.preprocessing.input_size == 32
    meta = report.training_meta(cohort="phantoms")
    assert meta.epochs == 1 and meta.settings["labelled"] == 0
    assert meta.settings["num_workers"] == 1  # the CPU default, recorded with the weights


def test_augmenting_workers_follow_the_device(monkeypatch):
    """One worker beside the CPU's training; on a GPU up to 8 cores augment, one left to
    the training loop, since augmentation is what a GPU waits for."""
    assert default_num_workers(torch.device("cpu")) == 1
    for cores, workers in ((16, 8), (64, 8), (6, 5), (2, 1), (1, 1)):
        monkeypatch.setattr("os.sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert default_num_workers(torch.device("cuda")) == workers


def test_train_with_some_labels(films):
    labels = ["abnormal", "normal", None, "normal", "abnormal", None, "normal", "abnormal"]
    _, report = train(films, labels, supervised_weight=1.0, **TINY)
    assert report.settings["classes"] == ["abnormal", "normal"] and report.settings["labelled"] == 6
    assert all(math.isfinite(v) and v > 0 for v in report.supervised_losses)
    assert report.epoch_losses[0] > report.contrastive_losses[0]


def test_train_refuses_what_cannot_train(films):
    with pytest.raises(ValueError, match="nothing to train"):
        train(films, None, **{**TINY, "arch": "raw-pixels"})
    with pytest.raises(ValueError, match="at least 2"):
        train(films[:1], None, **TINY)
    with pytest.raises(ValueError, match="labels"):
        train(films, ["normal"], **TINY)


def test_loss_falls_on_a_fixed_batch(films):
    """Overfitting check: the learner can fit one batch, so gradients reach the loss."""
    torch.manual_seed(0)
    prep = Preprocessing(input_size=32)
    dataset = ContrastiveDataset(films, [0, 1] * 4, prep, Augmentation())
    view1, view2, labels = (torch.stack(parts) for parts in zip(*(dataset[i] for i in range(8)), strict=True))
    learner = ContrastiveLearner(build_encoder("resnet18", dim=16, preprocessing=prep), supervised_weight=0.5)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        parts = learner(view1, view2, labels)
        optimizer.zero_grad()
        parts.total.backward()
        optimizer.step()
        losses.append(float(parts.total.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_views_are_augmented_and_normalised(films):
    prep = Preprocessing(input_size=32)
    dataset = ContrastiveDataset(films, [-1] * 8, prep, Augmentation())
    first, second, label = dataset[0]
    assert first.shape == second.shape == (1, 32, 32) and int(label) == -1
    assert not torch.equal(first, second)
    low, high = -prep.mean / prep.std, (1 - prep.mean) / prep.std
    assert float(first.min()) >= low - 1e-5 and float(first.max()) <= high + 1e-5


def test_nt_xent_rewards_matching_views():
    aligned = torch.eye(4)
    # Partner at similarity 1, the 6 others at 0: log(1 + 6·e^(-1/0.2)) = 0.0396.
    assert float(nt_xent(aligned, aligned, 0.2)) == pytest.approx(math.log(1 + 6 * math.exp(-5)), rel=1e-4)
    shuffled = aligned[[1, 2, 3, 0]]
    assert float(nt_xent(aligned, shuffled, 0.2)) > 4.0


def test_supcon_by_label_and_ignores_unlabelled():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    grouped = torch.stack([e1, e1, e2, e2])
    mixed = torch.stack([e1, e2, e1, e2])
    labels = torch.tensor([0, 0, 1, 1])
    assert float(supcon(grouped, labels, 0.1)) < float(supcon(mixed, labels, 0.1))
    # An unlabelled row changes nothing, wherever it points.
    with_unlabelled = torch.cat([grouped, e2[None]])
    same = supcon(with_unlabelled, torch.tensor([0, 0, 1, 1, -1]), 0.1)
    torch.testing.assert_close(same, supcon(grouped, labels, 0.1))
    # Nobody shares a label: no anchors, zero loss that still backpropagates.
    z = torch.randn(3, 2, requires_grad=True)
    lonely = supcon(z, torch.tensor([0, 1, -1]), 0.1)
    lonely.backward()
    assert float(lonely.detach()) == 0.0 and z.grad is not None


def test_label_indices():
    ids, classes = label_indices(["b", None, "a", "b"], 4)
    assert classes == ["a", "b"] and ids == [1, -1, 0, 1]
    assert label_indices(None, 3) == ([-1, -1, -1], [])
