"""The optimisation loop the classifier, the detector and the segmenter share (pure torch, no Django).

Each model says how to turn a batch into a loss; this module runs the epochs: AdamW
steps with an optional linear warm-up and a cosine decay, an optional wall-time budget
(on shared CPUs the step time cannot be known in advance, so the schedule follows
whichever of steps or seconds is further along, and a run stopped by the clock still
ends at a small learning rate), tqdm progress and the mean loss of every epoch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

log = logging.getLogger(__name__)


@dataclass
class LoopResult:
    losses: list[float]  # the mean loss of each epoch run
    steps: int
    seconds: float
    stopped_by_clock: bool


def fit(
    batch_loss: Callable[[Any], torch.Tensor],
    *,
    optimizer: torch.optim.Optimizer,
    epoch_batches: Callable[[], Iterable[Any]],
    epochs: int,
    steps_per_epoch: int,
    max_steps: int | None = None,
    max_seconds: float | None = None,
    warmup: bool = False,
    clip_grad_norm: float | None = None,
    name: str = "model",
    progress: bool = True,
) -> LoopResult:
    """Run `epochs` passes over `epoch_batches()` (called once per epoch, so it can
    draw a fresh order), one optimizer step per batch, until the steps, the epochs or
    `max_seconds` run out. Warm-up, when asked, lasts an epoch or a tenth of the run."""
    total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    warmup_steps = max(1, min(steps_per_epoch, total // 10)) if warmup else 0
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    started = time.perf_counter()

    def out_of_time() -> bool:
        return max_seconds is not None and time.perf_counter() - started >= max_seconds

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        by_steps = (step - warmup_steps) / max(1, total - warmup_steps)
        by_time = (time.perf_counter() - started) / max_seconds if max_seconds else 0.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, max(by_steps, by_time))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    losses: list[float] = []
    step, stopped_by_clock = 0, False
    bar = tqdm(total=total, desc=f"train {name}", unit="step", disable=not progress)
    for epoch in range(1, epochs + 1):
        epoch_sum, epoch_n = 0.0, 0
        for batch in epoch_batches():
            stopped_by_clock = out_of_time()
            if step >= total or stopped_by_clock:
                break
            loss = batch_loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(parameters, clip_grad_norm)
            optimizer.step()
            scheduler.step()
            value = float(loss.detach())
            epoch_sum, epoch_n, step = epoch_sum + value, epoch_n + 1, step + 1
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{value:.3f}")
        if epoch_n:
            losses.append(epoch_sum / epoch_n)
            log.info("%s epoch %d/%d: loss %.4f", name, epoch, epochs, losses[-1])
        if step >= total or stopped_by_clock:
            break
    bar.close()
    return LoopResult(losses, step, time.perf_counter() - started, stopped_by_clock)
