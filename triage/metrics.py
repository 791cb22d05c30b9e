"""Triage metrics: ROC, AUC, the workload curve and the rule-out threshold (numpy only,
no Django), plus the curves drawn as PNG.

Convention everywhere: a higher score means "more likely abnormal"; at threshold t an
exam with score >= t is flagged (read as usual) and one with score < t is ruled out
(likely negative). Sensitivity is the share of abnormal exams flagged, specificity the
share of normal exams ruled out, workload reduction the share of all exams ruled out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np


def _arrays(labels: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"{len(y)} labels for {len(s)} scores")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return y, s


def auc(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve: the probability that a random positive scores above a
    random negative, ties counting one half (Mann-Whitney U). None without both classes."""
    y, s = _arrays(labels, scores)
    positives, negatives = int(y.sum()), int((1 - y).sum())
    if positives == 0 or negatives == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_scores = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[y == 1].sum() - positives * (positives + 1) / 2
    return float(u / (positives * negatives))


def auc_interval(
    labels: Sequence[int], scores: Sequence[float], *, level: float = 0.95, draws: int = 2000, seed: int = 0
) -> tuple[float, float] | None:
    """A percentile bootstrap interval for the AUC: exams resampled with replacement
    within each class (so every draw keeps both), `draws` times. With a few dozen
    exams the interval is wide, and that is the point of printing it. None without
    both classes."""
    if not 0 < level < 1 or draws < 1:
        raise ValueError(f"need 0 < level < 1 and draws >= 1, got {level} and {draws}")
    y, s = _arrays(labels, scores)
    positive, negative = s[y == 1], s[y == 0]
    if len(positive) == 0 or len(negative) == 0:
        return None
    rng = np.random.default_rng(seed)
    values = np.empty(draws)
    for i in range(draws):
        pos = rng.choice(positive, len(positive))
        neg = rng.choice(negative, len(negative))
        # Mann-Whitney on the draw: P(positive > negative), ties one half.
        greater = (pos[:, None] > neg[None, :]).mean()
        ties = (pos[:, None] == neg[None, :]).mean()
        values[i] = greater + ties / 2
    tail = (1 - level) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def proportion_interval(successes: int, trials: int, *, level: float = 0.95) -> tuple[float, float] | None:
    """The exact (Clopper–Pearson) interval of a proportion such as a sensitivity:
    15 of 15 abnormal exams flagged is 0.782–1.000 at 95 %, which is all a validation
    cohort of 15 abnormal exams can promise. None for no trials."""
    if not 0 < level < 1:
        raise ValueError(f"need 0 < level < 1, got {level}")
    if not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes} of {trials}")
    if trials == 0:
        return None
    tail = (1 - level) / 2

    def at_least(p: float) -> float:  # P(X >= successes) for X ~ Binomial(trials, p); rises with p
        return sum(_binomial_pmf(i, trials, p) for i in range(successes, trials + 1))

    def at_most(p: float) -> float:  # P(X <= successes); falls as p rises
        return sum(_binomial_pmf(i, trials, p) for i in range(0, successes + 1))

    lower = 0.0 if successes == 0 else _bisect(lambda p: at_least(p) - tail, rising=True)
    upper = 1.0 if successes == trials else _bisect(lambda p: at_most(p) - tail, rising=False)
    return lower, upper


def _binomial_pmf(k: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 1.0 if k == 0 else 0.0
    if p >= 1.0:
        return 1.0 if k == n else 0.0
    log_pmf = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
    return math.exp(log_pmf + k * math.log(p) + (n - k) * math.log1p(-p))


def _bisect(f, *, rising: bool, steps: int = 60) -> float:
    """The root of a monotone f on [0, 1]."""
    low, high = 0.0, 1.0
    for _ in range(steps):
        mid = (low + high) / 2
        if (f(mid) < 0) == rising:
            low = mid
        else:
            high = mid
    return (low + high) / 2


@dataclass(frozen=True)
class CurvePoint:
    threshold: float
    sensitivity: float | None  # true positive rate (at_threshold: None without abnormal exams)
    specificity: float | None  # share of normals ruled out (at_threshold: None without normal exams)
    workload_reduction: float  # share of all exams ruled out (score < threshold)


def curve(labels: Sequence[int], scores: Sequence[float]) -> list[CurvePoint]:
    """One point per distinct score (as threshold) plus +inf (nothing flagged), from
    the highest threshold to the lowest: the ROC curve and the workload curve at once."""
    y, s = _arrays(labels, scores)
    positives, negatives, total = int(y.sum()), int((1 - y).sum()), len(y)
    points = [CurvePoint(math.inf, 0.0 if positives else 1.0, 1.0, 1.0 if total else 0.0)]
    for t in np.unique(s)[::-1]:
        flagged = s >= t
        tp = int((flagged & (y == 1)).sum())
        tn = int((~flagged & (y == 0)).sum())
        points.append(
            CurvePoint(
                threshold=float(t),
                sensitivity=tp / positives if positives else 1.0,
                specificity=tn / negatives if negatives else 1.0,
                workload_reduction=float((~flagged).sum()) / total,
            )
        )
    return points


def at_threshold(labels: Sequence[int], scores: Sequence[float], threshold: float) -> CurvePoint:
    """Sensitivity, specificity and workload reduction at one threshold. A cohort of
    one class leaves the other figure undefined (None), not a vacuous 1.0: a set of
    normals only (a second-source check of how many are ruled out) has no sensitivity."""
    (tp, positives), (tn, negatives), ruled_out = _confusion(labels, scores, threshold)
    total = positives + negatives
    return CurvePoint(
        threshold=float(threshold),
        sensitivity=tp / positives if positives else None,
        specificity=tn / negatives if negatives else None,
        workload_reduction=ruled_out / total if total else 0.0,
    )


def _confusion(
    labels: Sequence[int], scores: Sequence[float], threshold: float
) -> tuple[tuple[int, int], tuple[int, int], int]:
    """(flagged abnormal, abnormal), (ruled-out normal, normal) and all ruled out at a threshold."""
    y, s = _arrays(labels, scores)
    flagged = s >= threshold
    return (
        (int((flagged & (y == 1)).sum()), int(y.sum())),
        (int((~flagged & (y == 0)).sum()), int((1 - y).sum())),
        int((~flagged).sum()),
    )


def counts_at(labels: Sequence[int], scores: Sequence[float], threshold: float) -> dict[str, Any]:
    """Sensitivity and specificity at a threshold as counts (flagged abnormal exams of
    all abnormal, ruled-out normals of all normals) with their exact 95 % intervals
    (`proportion_interval`; None for a class the cohort lacks)."""
    (tp, positives), (tn, negatives), _ = _confusion(labels, scores, threshold)
    return {
        "sensitivity_counts": [tp, positives],
        "sensitivity_ci95": proportion_interval(tp, positives),
        "specificity_counts": [tn, negatives],
        "specificity_ci95": proportion_interval(tn, negatives),
    }


def threshold_for_sensitivity(labels: Sequence[int], scores: Sequence[float], target: float = 1.0) -> CurvePoint:
    """The highest threshold (most exams ruled out) whose sensitivity is at least
    `target`: the k-th highest positive score, k = ceil(target · positives)."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    y, s = _arrays(labels, scores)
    positive_scores = np.sort(s[y == 1])[::-1]
    if len(positive_scores) == 0:
        raise ValueError("no abnormal exams: sensitivity is undefined")
    k = max(1, math.ceil(target * len(positive_scores) - 1e-9))
    return at_threshold(y, s, float(positive_scores[k - 1]))


def rule_out_at_full_sensitivity(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """Share of normal exams scored below every abnormal one (ruled out with none missed)."""
    y, s = _arrays(labels, scores)
    if y.sum() == 0 or (1 - y).sum() == 0:
        return None
    return threshold_for_sensitivity(y, s, 1.0).specificity


def curve_dicts(points: Sequence[CurvePoint]) -> list[dict[str, float | None]]:
    """JSON-ready points (an infinite threshold becomes None)."""
    out = []
    for p in points:
        d = asdict(p)
        d["threshold"] = None if math.isinf(p.threshold) else round(p.threshold, 6)
        for key in ("sensitivity", "specificity", "workload_reduction"):
            d[key] = round(d[key], 6)
        out.append(d)
    return out


def plot_curves(
    points: Sequence[CurvePoint] | Sequence[dict],
    path: str | Path | None = None,
    *,
    title: str = "",
    operating_point: CurvePoint | dict | None = None,
) -> bytes:
    """ROC (sensitivity against 1 - specificity) and workload curve (share of normals
    ruled out against sensitivity) side by side, as PNG bytes; written to `path` too."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = [asdict(p) if isinstance(p, CurvePoint) else dict(p) for p in points]
    sens = [r["sensitivity"] for r in rows]
    spec = [r["specificity"] for r in rows]
    fig = Figure(figsize=(9, 4), dpi=100)
    roc, work = fig.subplots(1, 2)
    roc.plot([1 - v for v in spec], sens, drawstyle="steps-post", color="tab:blue")
    roc.plot([0, 1], [0, 1], linestyle=":", color="grey")
    roc.set(xlabel="1 − specificity", ylabel="sensitivity", title="ROC", xlim=(0, 1), ylim=(0, 1.02))
    work.plot(sens, spec, color="tab:green")
    work.set(
        xlabel="sensitivity kept",
        ylabel="share of normal exams ruled out",
        title="Workload",
        xlim=(0, 1.02),
        ylim=(0, 1),
    )
    op = None
    if operating_point is not None:
        op = asdict(operating_point) if isinstance(operating_point, CurvePoint) else dict(operating_point)
    if op is not None and op["sensitivity"] is not None and op["specificity"] is not None:
        roc.plot([1 - op["specificity"]], [op["sensitivity"]], "o", color="tab:red", label="operating point")
        work.plot([op["sensitivity"]], [op["specificity"]], "o", color="tab:red")
        roc.legend(loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    data = buffer.getvalue()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
    return data
