"""Training on the CPU at the speed of the reference's own stack: the model, the loop, the set-up.

Training is where an AutoLR run spends its time (every candidate trains a CNN), so this module is
about doing the reference's exact computation faster, never about computing something cheaper:
- `configure_process` stops glibc from returning the ~150 MB activation buffers to the OS after
  every step (and page-faulting them back in on the next one), which is most of what made stock
  torch eager 1.6-2.4x slower than TensorFlow here.
- `CNN` runs in channels_last (what oneDNN's fastest convolution and pooling kernels want), pools
  before the ReLU (max and ReLU commute exactly: relu(max(x)) == max(relu(x)) bit for bit, with the
  same gradient, on a 4x smaller tensor), and fuses ReLU with dropout.
- Dropout masks come from 64-bit words of an explicit torch.Generator cut into bytes: one random
  byte per element is an exact Bernoulli draw when 256 * keep-probability is an integer (0.75 and
  0.5 are), at a tenth of the cost of `bernoulli_`. Every random source of a training run is a
  generator derived from its seed, so a candidate's training is reproducible bit for bit (for a
  fixed thread count: oneDNN's reductions depend on it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CNN",
    "FitResult",
    "ModelSpec",
    "configure_process",
    "evaluate",
    "fit",
    "retain_heap",
]

# glibc mallopt parameters (malloc.h); the values are part of glibc's ABI.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULT_MMAP_MAX = 65536
_DEFAULT_TRIM_THRESHOLD = 128 * 1024


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.mallopt  # noqa: B018 - musl and others lack it
    except (OSError, AttributeError):
        return None
    return libc


def retain_heap(keep: bool = True) -> bool:
    """Keep freed heap memory in the process (True) or restore glibc's defaults (False).

    Without it glibc serves each large activation with a fresh mmap and unmaps it on free, so
    every step page-faults ~300 MB in again (measured: 1.6x slower epochs at one thread). The
    cost is memory: the process keeps its peak heap plus some fragmentation (reference CNN at
    batch 1000 with the paper data loaded: RSS settles at 1.45 GB, against a 1.24 GB peak and
    0.78 GB between steps without). Returns False where the C library has no mallopt (not
    glibc): nothing changed.
    """
    libc = _libc()
    if libc is None:
        return False
    if keep:
        return libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    restored = libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX) == 1
    restored &= libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD) == 1
    libc.malloc_trim(0)
    return bool(restored)


def _set_numba_threads(threads: int) -> int | None:
    """Give numba's parallel kernels (the evolved optimizers) the same cores as torch.

    Left at its default (every core), a one-thread worker's optimizer step fights torch's
    OpenMP pool and the other workers: measured 8 ms a step instead of 0.5 ms for 0.3M
    parameters. numba's setting is per calling thread: call this from the thread that trains.
    """
    try:
        import numba
    except ImportError:
        return None
    count = min(threads, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(count)
    return count


def configure_process(threads: int = 1) -> dict[str, object]:
    """Call once at the start of every process that trains (each pool worker, each Ray actor).

    Sets torch's and numba's threads (a worker owns `threads` cores; more would oversubscribe
    the machine) and keeps freed heap memory in the process (`retain_heap`): call it before the
    first training step. Returns what was set, for logs.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    # numba first: with its OpenMP threading layer, numba.set_num_threads resets torch's
    # OpenMP thread count (measured: torch back at 2 threads after asking both for 1).
    numba_threads = _set_numba_threads(threads)
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)  # nothing here runs ops concurrently
    except RuntimeError:
        pass  # already fixed: only settable before the first parallel op, harmless to skip
    return {"threads": threads, "numba_threads": numba_threads, "heap_kept": retain_heap(True)}


@dataclass(frozen=True)
class ModelSpec:
    """The reference Keras mnist_cnn, with its widths as parameters so small presets can shrink it.

    Conv(conv1, 3x3) ReLU -> Conv(conv2, 3x3) ReLU -> MaxPool 2 -> Dropout(dropout1) -> Flatten
    -> Dense(dense) ReLU -> Dropout(dropout2) -> Dense(classes); defaults are the reference's.
    """

    conv1: int = 32
    conv2: int = 64
    dense: int = 128
    dropout1: float = 0.25
    dropout2: float = 0.5
    classes: int = 10
    image_size: int = 28

    def __post_init__(self) -> None:
        for name in ("conv1", "conv2", "dense", "classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelSpec.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("dropout1", "dropout2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(
                    f"ModelSpec.{name} is a drop probability in [0, 1), got {getattr(self, name)}"
                )
        if self.image_size < 6 or self.image_size % 2:
            raise ValueError(f"ModelSpec.image_size must be even and >= 6, got {self.image_size}")

    @property
    def pooled(self) -> int:
        return (self.image_size - 4) // 2

    def build(self, seed: int, device: str | torch.device = "cpu") -> CNN:
        """A fresh model whose initial weights depend on `seed` alone: every candidate starts alike.

        Weights are drawn on the CPU and then moved, so they are the same on every device.
        """
        return CNN(self, seed).to(device)


class _ReluDropout(torch.autograd.Function):
    """relu(x) * mask in one op that keeps only its output for the backward pass.

    The mask holds 0 or 1/(1-p), so relu(x * mask) equals relu(x) * mask exactly (up to the sign
    of a zero), and out > 0 exactly where x > 0 and the element is kept (a scale > 1 cannot
    underflow a positive float to 0): the output alone gives the gradient, grad * scale where
    out > 0, the same as ReLU's backward followed by dropout's.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: torch.Tensor, mask: torch.Tensor, scale: float
    ) -> torch.Tensor:
        out = torch.mul(x, mask).relu_()
        ctx.save_for_backward(out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (out,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad, out, 0).mul_(ctx.scale), None, None


def _scaled_mask(numel: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """A flat float mask: 1/(1-p) with probability 1-p, else 0, drawn from `generator`.

    One random byte per element (64-bit words cut into bytes) is an exact Bernoulli draw when
    256 * (1-p) is an integer; comparing in place in float keeps every pass vectorised (a bool
    mask with `where` costs 4x more here).
    """
    scale = 1.0 / (1.0 - p)
    keep = (1.0 - p) * 256.0
    if keep == int(keep):
        words = torch.empty((numel + 7) // 8, dtype=torch.int64, device=generator.device)
        words.random_(-(2**63), None, generator=generator)  # the full 64-bit range: 8 fair bytes
        mask = words.view(torch.uint8)[:numel].float().lt_(keep)
    else:
        mask = torch.rand(numel, generator=generator, device=generator.device).ge_(p)
    return mask.mul_(scale)


def _relu_dropout(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None or p == 0.0:  # evaluation, or no dropout at all
        return torch.relu(x) if torch.is_grad_enabled() else x.relu_()
    mask = _scaled_mask(x.numel(), p, generator)
    if x.dim() == 4:  # drawn in memory order (NHWC), viewed in logical order (NCHW)
        n, c, h, w = x.shape
        mask = mask.view(n, h, w, c).permute(0, 3, 1, 2)
    else:
        mask = mask.view(x.shape)
    return _ReluDropout.apply(x, mask, 1.0 / (1.0 - p))


class CNN(nn.Module):
    """The reference CNN, channels_last, Glorot-uniform kernels and zero biases as in Keras.

    `forward(x, dropout=generator)` trains with dropout masks drawn from that generator;
    `forward(x)` is the evaluation pass (no dropout), as Keras's training flag.
    Flatten uses Keras's (height, width, channel) order, which channels_last gives for free.
    """

    def __init__(self, spec: ModelSpec, seed: int) -> None:
        super().__init__()
        self.spec = spec
        self.conv1 = nn.Conv2d(1, spec.conv1, 3)
        self.conv2 = nn.Conv2d(spec.conv1, spec.conv2, 3)
        self.fc1 = nn.Linear(spec.conv2 * spec.pooled**2, spec.dense)
        self.fc2 = nn.Linear(spec.dense, spec.classes)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in (self.conv1, self.conv2, self.fc1, self.fc2):
                nn.init.xavier_uniform_(layer.weight, generator=generator)
                layer.bias.zero_()
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor, dropout: torch.Generator | None = None) -> torch.Tensor:
        spec = self.spec
        x = x.contiguous(memory_format=torch.channels_last)  # a no-op for 1-channel images
        x = F.relu(self.conv1(x), inplace=True)  # conv backward needs its input, not its output
        x = F.max_pool2d(self.conv2(x), 2)  # pool first: relu commutes with max
        x = _relu_dropout(x, spec.dropout1, dropout)
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # NHWC order, a view in channels_last
        x = _relu_dropout(self.fc1(x), spec.dropout2, dropout)
        return self.fc2(x)


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


def evaluate(
    model: CNN, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) without dropout or autograd bookkeeping."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(y), batch_size):
            logits = model(x[start : start + batch_size])
            target = y[start : start + batch_size]
            loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(1) == target).sum())
    model.train(was_training)
    n = max(len(y), 1)
    return loss_sum / n, correct / n


def fit(
    model: CNN,
    optimizer: torch.optim.Optimizer,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    *,
    seed: int,
    batch_size: int,
    max_epochs: int,
    patience: int,
    monitor: str = "val_acc",
    schedule: Callable[[int, float], float] | None = None,
    deadline: float | None = None,
    eval_batch: int = 1000,
) -> FitResult:
    """Keras-style fit with early stopping that always restores the best epoch's weights.

    `monitor` is "val_acc" (higher is better) or "val_loss" (lower); an epoch must strictly beat
    the best to count, as Keras's EarlyStopping with min_delta=0. `schedule(epoch, lr)` sets the
    learning rate at the start of every epoch, the first included, from the current one (Keras's
    LearningRateScheduler; the DLR protocol). `deadline` is a time.perf_counter() value past
    which training stops with a timeout reason. A non-finite loss stops training at once with a
    reason: nothing after it means anything. `seed` fixes the shuffling and the dropout masks.
    """
    if monitor not in ("val_acc", "val_loss"):
        raise ValueError(f"monitor must be 'val_acc' or 'val_loss', got {monitor!r}")
    if min(batch_size, max_epochs, patience, eval_batch) < 1:
        raise ValueError(
            "batch_size, max_epochs, patience and eval_batch must be >= 1, got "
            f"{batch_size}, {max_epochs}, {patience}, {eval_batch}"
        )
    start = time.perf_counter()
    x, y = train
    n = len(y)
    device = next(model.parameters()).device
    # Two streams so changing the batch size does not change the dropout masks' source order.
    # The shuffle is drawn on the CPU (the same order on every device); masks where they are used.
    shuffle_gen = torch.Generator().manual_seed(seed)
    dropout_gen = torch.Generator(device=device).manual_seed(seed + 0x5EED)
    better = (lambda a, b: a > b) if monitor == "val_acc" else (lambda a, b: a < b)
    best_value, best_epoch, best_state = None, -1, None
    curves: dict[str, list[float]] = {"train_loss": [], "val_acc": [], "val_loss": [], "lr": []}
    reason = None
    model.train()
    for epoch in range(max_epochs):
        if schedule is not None:
            lr = float(schedule(epoch, optimizer.param_groups[0]["lr"]))
            if not math.isfinite(lr):
                reason = f"diverged: schedule gave lr={lr} at epoch {epoch}"
                break
            for group in optimizer.param_groups:
                group["lr"] = lr
        order = torch.randperm(n, generator=shuffle_gen).to(device)
        loss_sum = 0.0
        for first in range(0, n, batch_size):
            idx = order[first : first + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx], dropout=dropout_gen), y[idx])
            batch_loss = float(loss.detach())
            if not math.isfinite(batch_loss):
                step = first // batch_size
                reason = f"diverged: training loss {batch_loss} at epoch {epoch}, step {step}"
                break
            loss.backward()
            optimizer.step()
            loss_sum += batch_loss * len(idx)
            if deadline is not None and time.perf_counter() > deadline:
                reason = f"timeout: deadline passed at epoch {epoch}, step {first // batch_size}"
                break
        if reason is not None:
            break
        val_loss, val_acc = evaluate(model, *val, batch_size=eval_batch)
        curves["train_loss"].append(loss_sum / n)
        curves["val_acc"].append(val_acc)
        curves["val_loss"].append(val_loss)
        curves["lr"].append(float(optimizer.param_groups[0]["lr"]))
        if not math.isfinite(val_loss):
            reason = f"diverged: validation loss {val_loss} at epoch {epoch}"
            break
        value = val_acc if monitor == "val_acc" else val_loss
        if best_value is None or better(value, best_value):
            best_value, best_epoch = value, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif epoch - best_epoch >= patience:
            break
        if deadline is not None and time.perf_counter() > deadline:
            reason = f"timeout: deadline passed after epoch {epoch}"
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(
        epochs=len(curves["val_acc"]),
        best_epoch=best_epoch,
        train_loss=tuple(curves["train_loss"]),
        val_acc=tuple(curves["val_acc"]),
        val_loss=tuple(curves["val_loss"]),
        lr=tuple(curves["lr"]),
        seconds=time.perf_counter() - start,
        reason=reason,
    )
