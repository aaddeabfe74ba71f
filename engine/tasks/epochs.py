"""One epoch of training, shared by the presets' `fit` and a SupervisedTask's `fit_supervised`:
the schedule's learning rate, then the batches, with the same "diverged" and "timeout" reasons
(the results store and the run's checks read them)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

__all__ = ["schedule_lr", "train_epoch"]


def schedule_lr(optimizer: torch.optim.Optimizer, schedule: Callable[[int, float], float] | None,
                epoch: int) -> str | None:
    """Set every group's lr to `schedule(epoch, lr)`; a "diverged" reason when it is not finite."""
    if schedule is None:
        return None
    lr = float(schedule(epoch, optimizer.param_groups[0]["lr"]))
    if not math.isfinite(lr):
        return f"diverged: schedule gave lr={lr} at epoch {epoch}"
    for group in optimizer.param_groups:
        group["lr"] = lr
    return None


def train_epoch(
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    order: torch.Tensor,
    batch_size: int,
    epoch: int,
    deadline: float | None,
) -> tuple[float, str | None]:
    """One epoch over `order` in batches: (sum of loss x batch size, reason or None). A
    non-finite loss stops it with a "diverged" reason, a passed `deadline` with a "timeout"."""
    loss_sum = 0.0
    for first in range(0, len(order), batch_size):
        idx = order[first : first + batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(idx)
        batch_loss = float(loss.detach())
        if not math.isfinite(batch_loss):
            step = first // batch_size
            return loss_sum, f"diverged: training loss {batch_loss} at epoch {epoch}, step {step}"
        loss.backward()
        optimizer.step()
        loss_sum += batch_loss * len(idx)
        if deadline is not None and time.perf_counter() > deadline:
            step = first // batch_size
            return loss_sum, f"timeout: deadline passed at epoch {epoch}, step {step}"
    return loss_sum, None
