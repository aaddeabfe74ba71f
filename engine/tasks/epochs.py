"""The epoch loop shared by the presets' `fit` and a SupervisedTask's `fit_supervised`: each
epoch the schedule's learning rate, then the batches, then validation and early stopping, with
the same "diverged" and "timeout" reasons (the results store and the run's checks read them)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["FitResult", "fit_epochs", "schedule_lr", "train_epoch"]


@dataclass(frozen=True)
class FitResult:
    """One training run. `reason` is None when it ended normally (patience or max epochs)."""

    epochs: int
    best_epoch: int  # 0-based index into the curves; -1 when no epoch completed
    train_loss: tuple[float, ...]
    val_acc: tuple[float, ...]
    val_loss: tuple[float, ...]
    lr: tuple[float, ...]  # the learning rate each epoch ran with (param group 0)
    seconds: float
    reason: str | None


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


def fit_epochs(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    validate: Callable[[], tuple[float, float]],
    *,
    n: int,
    batch_size: int,
    epochs: int,
    patience: int,
    shuffle: torch.Generator,
    start: float,
    lower_is_better: bool = False,
    schedule: Callable[[int, float], float] | None = None,
    deadline: float | None = None,
) -> FitResult:
    """Up to `epochs` epochs over `n` examples shuffled by `shuffle` (on the CPU: the same order
    on every device); `validate()` gives (validation loss, score), the score filling the curves'
    `val_acc`. Early stopping watches the score (or, `lower_is_better`, the loss): an epoch must
    strictly beat the best, as Keras's EarlyStopping with min_delta=0, and the best epoch's
    weights are restored at the end. `start` (time.perf_counter()) is when the fit began."""
    device = next(model.parameters()).device
    best_value, best_epoch, best_state, reason = None, -1, None, None
    curves: dict[str, list[float]] = {"train_loss": [], "val_acc": [], "val_loss": [], "lr": []}
    model.train()
    for epoch in range(epochs):
        reason = schedule_lr(optimizer, schedule, epoch)
        if reason is not None:
            break
        order = torch.randperm(n, generator=shuffle).to(device)
        loss_sum, reason = train_epoch(loss_of, optimizer, order, batch_size, epoch, deadline)
        if reason is not None:
            break
        val_loss, score = validate()
        for key, value in (("train_loss", loss_sum / n), ("val_acc", score),
                           ("val_loss", val_loss),
                           ("lr", float(optimizer.param_groups[0]["lr"]))):
            curves[key].append(value)
        if not math.isfinite(val_loss):
            reason = f"diverged: validation loss {val_loss} at epoch {epoch}"
            break
        value = val_loss if lower_is_better else score
        if best_value is None or (value < best_value if lower_is_better else value > best_value):
            best_value, best_epoch = value, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif epoch - best_epoch >= patience:
            break
        if deadline is not None and time.perf_counter() > deadline:
            reason = f"timeout: deadline passed after epoch {epoch}"
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(epochs=len(curves["val_acc"]), best_epoch=best_epoch,
                     train_loss=tuple(curves["train_loss"]), val_acc=tuple(curves["val_acc"]),
                     val_loss=tuple(curves["val_loss"]), lr=tuple(curves["lr"]),
                     seconds=time.perf_counter() - start, reason=reason)
