"""The shared optimisation loop of the detector and the segmenter."""

from __future__ import annotations

import torch

from triage.loop import fit


def problem():
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)

    def batches():
        return (list(range(start, start + 16)) for start in range(0, 64, 16))

    def loss(batch):
        index = torch.tensor(batch)
        return torch.nn.functional.mse_loss(model(x[index]).squeeze(-1), y[index])

    return loss, optimizer, batches


def test_fit_runs_the_epochs_and_the_loss_falls():
    loss, optimizer, batches = problem()
    run = fit(loss, optimizer=optimizer, epoch_batches=batches, epochs=20, steps_per_epoch=4, progress=False)
    assert run.steps == 80 and len(run.losses) == 20 and not run.stopped_by_clock
    assert run.losses[-1] < run.losses[0] / 4
    # The cosine schedule ends near zero.
    assert optimizer.param_groups[0]["lr"] < 0.05 * 0.01


def test_fit_stops_at_max_steps_and_at_the_clock():
    loss, optimizer, batches = problem()
    run = fit(
        loss, optimizer=optimizer, epoch_batches=batches, epochs=20, steps_per_epoch=4, max_steps=6,
        warmup=True, clip_grad_norm=1.0, progress=False,
    )  # fmt: skip
    assert run.steps == 6 and len(run.losses) == 2

    loss, optimizer, batches = problem()
    run = fit(loss, optimizer=optimizer, epoch_batches=batches, epochs=5, steps_per_epoch=4, max_seconds=0.0)
    assert run.stopped_by_clock and run.steps == 0 and run.losses == []
