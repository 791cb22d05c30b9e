"""Retrieval metrics on cases small enough to work out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from embeddings.metrics import chance_metrics, recall_at_k, retrieval_metrics

# Four points in 2-D. Cosine similarities, worked out once:
#   a–b 0.994, c–d 0.994, b–d 0.22, b–c 0.11, a–d 0.11, a–c 0.
# Labels: a, b, d are "x"; c is "y". Patients: {a, b} and {c, d}.
EMBEDDINGS = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
LABELS = ["x", "x", "y", "x"]
GROUPS = ["p1", "p1", "p2", "p2"]


def test_precision_and_map_by_hand():
    # Rankings: a → b d c; b → a d c; c → d b a; d → c b a.
    # Hits (label x = x): a: 1 1 0; b: 1 1 0; c: none relevant; d: 0 1 1.
    result = retrieval_metrics(EMBEDDINGS, LABELS, ks=(1, 2, 3))
    assert result["queries"] == 4
    assert result["precision_at"][1] == pytest.approx((1 + 1 + 0 + 0) / 4)
    assert result["precision_at"][2] == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    assert result["precision_at"][3] == pytest.approx((2 / 3 + 2 / 3 + 0 + 2 / 3) / 4)
    # AP: a 1, b 1, d (1/2 + 2/3)/2 = 7/12; c has no relevant candidate and is left out.
    assert result["map"] == pytest.approx((1 + 1 + 7 / 12) / 3)


def test_same_group_neighbours_are_excluded():
    # Candidates are the other patient's images only:
    # a → d c (hit, miss); b → d c (hit, miss); c → b a (no x for a "y"); d → b a (hit, hit).
    result = retrieval_metrics(EMBEDDINGS, LABELS, GROUPS, ks=(1, 2))
    assert result["precision_at"][1] == pytest.approx(3 / 4)
    assert result["precision_at"][2] == pytest.approx((0.5 + 0.5 + 0 + 1) / 4)
    assert result["map"] == pytest.approx(1.0)


def test_same_group_twin_never_counts():
    # Each query's nearest neighbour is its own patient's other view, with its label:
    # without exclusion P@1 is perfect, with it every hit must come from elsewhere.
    emb = np.array([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]])
    labels = ["n", "n", "a", "a"]
    assert retrieval_metrics(emb, labels, ks=(1,))["precision_at"][1] == 1.0
    excluded = retrieval_metrics(emb, labels, ["p", "p", "q", "q"], ks=(1,))
    assert excluded["precision_at"][1] == 0.0
    assert math.isnan(excluded["map"])  # no query has a relevant candidate left


def test_k_beyond_candidates_uses_those_there_are():
    result = retrieval_metrics(EMBEDDINGS, LABELS, GROUPS, ks=(10,))
    assert result["precision_at"][10] == pytest.approx((0.5 + 0.5 + 0 + 1) / 4)


def test_embeddings_need_not_be_normalised_and_bad_shapes_fail():
    scaled = EMBEDDINGS * np.array([[3.0], [0.5], [2.0], [7.0]])
    assert retrieval_metrics(scaled, LABELS) == retrieval_metrics(EMBEDDINGS, LABELS)
    with pytest.raises(ValueError, match="labels"):
        retrieval_metrics(EMBEDDINGS, LABELS[:3])
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(EMBEDDINGS, LABELS, ks=(0,))


def test_recall_at_k_by_hand():
    approx = np.array([[1, 2, 3], [4, 5, -1], [7, 8, 9]])
    exact = np.array([[1, 3, 9], [4, 6, 7], [-1, -1, -1]])  # the last query found nothing: skipped
    assert recall_at_k(approx, exact, 3) == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert recall_at_k(approx, exact, 1) == pytest.approx(1.0)
    assert recall_at_k(approx[:, ::-1], exact, 1) == pytest.approx(0.0)  # 3 vs 1, -1 vs 4
    with pytest.raises(ValueError):
        recall_at_k(approx, exact, 4)


@pytest.mark.parametrize("normal,abnormal", [(100, 100), (150, 50)])
def test_chance_level_matches_the_label_shares(normal, abnormal):
    """Random vectors find a same-label neighbour as often as the label shares say:
    for a query of a class of m among n, (m - 1) / (n - 1)."""
    labels = ["normal"] * normal + ["abnormal"] * abnormal
    n = len(labels)
    expected = (normal * (normal - 1) + abnormal * (abnormal - 1)) / (n * (n - 1))
    chance = chance_metrics(labels, ks=(1, 5), dim=16, seeds=40)
    for k in (1, 5):
        figures = chance["precision_at"][k]
        assert figures["mean"] == pytest.approx(expected, abs=0.03)
        assert 0 < figures["sd"] < 0.1 and figures["low"] <= figures["mean"] <= figures["high"]
    assert chance["seeds"] == 40 and chance["map"]["mean"] == pytest.approx(expected, abs=0.05)
    with pytest.raises(ValueError, match="seeds must be at least 1"):
        chance_metrics(labels, seeds=0)
