"""Retrieval quality over a labelled set (pure numpy; no faiss, no torch, no Django).

Every image is a query against all the others, ranked by exact cosine similarity. A
neighbour is relevant when it carries the query's label. With groups (patients), the
query's own group is removed from the candidates altogether: the other view of the
same breast is trivially similar, and a radiologist already has it, so it must count
neither as a hit nor as a miss.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Queries are scored in blocks so that N×N similarities never sit in memory at once.
_BLOCK = 1024


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def retrieval_metrics(
    embeddings: np.ndarray,
    labels: Sequence[object] | np.ndarray,
    groups: Sequence[object] | np.ndarray | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, object]:
    """precision@k and mean average precision (mAP), leave-one-out over the set.

    - precision@k: share of the top k candidates with the query's label. When a query
      has fewer than k candidates, the share is over the candidates it has.
    - AP: the mean, over the relevant candidates, of the precision at each one's rank
      in the full ranking; mAP averages over queries with at least one relevant
      candidate (AP is undefined without one).
    - `groups`: candidates of the query's own group are excluded (same patient); without
      groups only the query itself is.
    Ties in similarity are broken by index, so results are reproducible.

    Returns {"precision_at": {k: value}, "map": value, "queries": count}; values are
    NaN when no query qualifies.
    """
    x = _unit_rows(np.asarray(embeddings, dtype=np.float64))
    labels = np.asarray(labels, dtype=object)
    n = len(x)
    if labels.shape != (n,):
        raise ValueError(f"labels must have one entry per embedding ({n}), got shape {labels.shape}")
    group_ids = None
    if groups is not None:
        group_ids = np.asarray(groups, dtype=object)
        if group_ids.shape != (n,):
            raise ValueError(f"groups must have one entry per embedding ({n}), got shape {group_ids.shape}")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")

    hits_at = {k: [] for k in ks}
    average_precisions = []
    for start in range(0, n, _BLOCK):
        stop = min(n, start + _BLOCK)
        similarity = x[start:stop] @ x.T
        for row, query in enumerate(range(start, stop)):
            allowed = np.ones(n, dtype=bool)
            allowed[query] = False
            if group_ids is not None:
                allowed &= group_ids != group_ids[query]
            candidates = np.flatnonzero(allowed)
            if len(candidates) == 0:
                continue
            order = candidates[np.argsort(-similarity[row, candidates], kind="stable")]
            relevant = labels[order] == labels[query]
            for k in ks:
                top = relevant[:k]
                hits_at[k].append(top.mean())
            if relevant.any():
                ranks = np.flatnonzero(relevant) + 1
                average_precisions.append(float(np.mean(np.arange(1, len(ranks) + 1) / ranks)))

    queries = len(hits_at[ks[0]])
    return {
        "precision_at": {k: float(np.mean(v)) if v else float("nan") for k, v in hits_at.items()},
        "map": float(np.mean(average_precisions)) if average_precisions else float("nan"),
        "queries": queries,
    }


def chance_metrics(
    labels: Sequence[object] | np.ndarray,
    groups: Sequence[object] | np.ndarray | None = None,
    ks: Sequence[int] = (1, 5, 10),
    *,
    dim: int = 512,
    seeds: int = 50,
) -> dict[str, object]:
    """What `retrieval_metrics` gives for random vectors on the same labels and groups:
    the level an encoder must clear to have learnt anything. With few queries and
    unbalanced labels, chance is far from 1/classes and noisy, so the spread over
    `seeds` draws (standard deviation, and the 2.5-97.5 % range) comes with the mean.

    Returns {"seeds", "precision_at": {k: {"mean", "sd", "low", "high"}}, "map": {...}}.
    """
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    n = len(labels)
    runs = [
        retrieval_metrics(np.random.default_rng(seed).standard_normal((n, dim)), labels, groups, ks)
        for seed in range(seeds)
    ]

    def spread(values: list[float]) -> dict[str, float]:
        v = np.asarray(values, dtype=np.float64)
        return {
            "mean": float(v.mean()),
            "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "low": float(np.percentile(v, 2.5)),
            "high": float(np.percentile(v, 97.5)),
        }

    ks = sorted({int(k) for k in ks})
    return {
        "seeds": seeds,
        "precision_at": {k: spread([r["precision_at"][k] for r in runs]) for k in ks},
        "map": spread([r["map"] for r in runs]),
    }


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Mean share of each query's exact top k that the approximate search found in its top k.

    Both are nq×≥k arrays of ids, best first; -1 (faiss's "no result") is ignored on
    both sides, and queries whose exact search found nothing are skipped.
    """
    approx = np.asarray(approx_ids)
    exact = np.asarray(exact_ids)
    if approx.ndim != 2 or exact.ndim != 2 or len(approx) != len(exact):
        raise ValueError(f"expected two nq×k id arrays, got shapes {approx.shape} and {exact.shape}")
    if k < 1 or approx.shape[1] < k or exact.shape[1] < k:
        raise ValueError(f"k={k} needs at least k columns, got {approx.shape[1]} and {exact.shape[1]}")
    recalls = []
    for found, truth in zip(approx[:, :k], exact[:, :k], strict=True):
        truth = set(truth[truth != -1].tolist())
        if truth:
            recalls.append(len(truth & set(found[found != -1].tolist())) / len(truth))
    return float(np.mean(recalls)) if recalls else float("nan")
