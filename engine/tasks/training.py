"""Training on the CPU at the speed of the reference's own stack: the model, the loop, the set-up.

Training is where an AutoLR run spends its time, so this module does the reference's exact
computation faster, never something cheaper:
- `configure_process` stops glibc from returning the ~150 MB activation buffers to the OS after
  every step (and page-faulting them back in on the next), most of what made stock torch eager
  1.6-2.4x slower than TensorFlow here.
- `CNN` runs in channels_last (oneDNN's fastest convolutions), pools before the ReLU (relu and
  max commute exactly, and the ReLU then sees a 4x smaller tensor), and does max-pool + ReLU +
  dropout in one Numba pass each way instead of torch's five.
- Dropout masks are random bytes from 64-bit words of an explicit torch.Generator: one byte per
  element is an exact Bernoulli draw when 256 * keep-probability is an integer (0.75 and 0.5
  are), at a tenth of the cost of `bernoulli_`. Every random source is a generator derived from
  the seed, so training is reproducible bit for bit (at a fixed thread count: oneDNN's
  reductions depend on it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.tasks.epochs import FitResult, fit_epochs

try:
    import numba
except ImportError:  # the torch path below computes the same, only slower
    numba = None

__all__ = ["CNN", "FitResult", "ModelSpec", "configure_process", "fit", "loss_accuracy",
           "retain_heap"]

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
    if numba is None:
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


def _random_bytes(numel: int, generator: torch.Generator) -> torch.Tensor:
    """`numel` fair random bytes: 64-bit words over their full range, cut into bytes."""
    words = torch.empty((numel + 7) // 8, dtype=torch.int64, device=generator.device)
    words.random_(-(2**63), None, generator=generator)
    return words.view(torch.uint8)[:numel]


def _keep_below(p: float) -> int | None:
    """A byte b keeps its element iff b < this: exact when 256 * (1-p) is an integer."""
    keep = (1.0 - p) * 256.0
    return int(keep) if keep == int(keep) else None


def _scaled_mask(numel: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """A flat float mask: 1/(1-p) with probability 1-p, else 0, drawn from `generator`.

    One random byte per element (64-bit words cut into bytes) is an exact Bernoulli draw when
    256 * (1-p) is an integer; comparing in place in float keeps every pass vectorised (a bool
    mask with `where` costs 4x more here).
    """
    scale = 1.0 / (1.0 - p)
    keep = _keep_below(p)
    if keep is not None:
        mask = _random_bytes(numel, generator).float().lt_(keep)
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


# --- max-pool 2x2 + ReLU + dropout as one pass each way (Numba, CPU) ---------------------------
# torch's pooling writes int64 argmax indices and its backward zero-fills the 147 MB input gradient
# before scattering into it: ~110 ms a step at one thread with the ReLU and dropout passes. These
# kernels read the conv output once and keep a one-byte code per output (argmax 0-3 in window
# order, or 4: no gradient), and the backward writes each input gradient exactly once: ~35 ms.
# Same rules as torch: the first maximum in (0,0) (0,1) (1,0) (1,1) order wins, NaN beats all,
# relu(NaN) = NaN; the results are bit-identical to the torch path (tested).


def _pool_forward(x, rnd, masked, keep_below, scale, out, code):  # pragma: no cover - numba
    n_images, height, width, channels = x.shape
    rows = height // 2
    for nr in numba.prange(n_images * rows):
        n, i = nr // rows, nr % rows
        for j in range(width // 2):
            for c in range(channels):
                best, k = x[n, 2 * i, 2 * j, c], 0
                v = x[n, 2 * i, 2 * j + 1, c]
                if v > best or v != v:
                    best, k = v, 1
                v = x[n, 2 * i + 1, 2 * j, c]
                if v > best or v != v:
                    best, k = v, 2
                v = x[n, 2 * i + 1, 2 * j + 1, c]
                if v > best or v != v:
                    best, k = v, 3
                kept = not masked or rnd[n, i, j, c] < keep_below
                o = best * (scale if kept else np.float32(0.0))
                if o > 0 or o != o:
                    out[n, i, j, c], code[n, i, j, c] = o, k
                else:
                    out[n, i, j, c], code[n, i, j, c] = 0.0, 4


def _pool_backward(grad, code, scale, grad_in):  # pragma: no cover - numba
    n_images, rows, cols, channels = grad.shape
    zero = np.float32(0.0)
    for nr in numba.prange(n_images * rows):
        n, i = nr // rows, nr % rows
        for j in range(cols):
            for c in range(channels):
                k, v = code[n, i, j, c], grad[n, i, j, c] * scale
                grad_in[n, 2 * i, 2 * j, c] = v if k == 0 else zero
                grad_in[n, 2 * i, 2 * j + 1, c] = v if k == 1 else zero
                grad_in[n, 2 * i + 1, 2 * j, c] = v if k == 2 else zero
                grad_in[n, 2 * i + 1, 2 * j + 1, c] = v if k == 3 else zero


@functools.cache
def _pool_kernels() -> tuple[Callable, Callable] | None:
    """Compiled on first use and cached on disk by Numba (about 2 s once, then ~0.3 s a process)."""
    if numba is None:
        return None
    jit = numba.njit(parallel=True, cache=True, nogil=True)
    return jit(_pool_forward), jit(_pool_backward)


def _numba_threads_like_torch() -> None:
    """Numba's loops get torch's thread count (Numba's first launch resets OpenMP's: restore)."""
    threads = torch.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


class _PoolReluDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rnd, keep_below, scale):  # type: ignore[override]
        n, c, h, w = x.shape
        out = torch.empty((n, h // 2, w // 2, c))
        code = torch.empty((n, h // 2, w // 2, c), dtype=torch.uint8)
        masked = rnd is not None
        rnd = rnd if masked else code[:1, :1, :1, :1]  # never read: a typed stand-in
        _numba_threads_like_torch()
        forward = _pool_kernels()[0]
        forward(x.detach().permute(0, 2, 3, 1).numpy(), rnd.numpy(), masked, keep_below,
                np.float32(scale), out.numpy(), code.numpy())
        ctx.save_for_backward(code)
        ctx.scale = np.float32(scale)
        return out.permute(0, 3, 1, 2)  # logical NCHW, channels_last in memory

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (code,) = ctx.saved_tensors
        n, h, w, c = code.shape
        grad = grad.permute(0, 2, 3, 1).contiguous()  # a no-op for the usual channels_last grad
        grad_in = torch.empty((n, 2 * h, 2 * w, c))
        _numba_threads_like_torch()
        _pool_kernels()[1](grad.numpy(), code.numpy(), ctx.scale, grad_in.numpy())
        return grad_in.permute(0, 3, 1, 2), None, None, None


def _pool_relu_dropout(
    x: torch.Tensor, p: float, generator: torch.Generator | None, allow_fused: bool = True
) -> torch.Tensor:
    """relu(max_pool2d(x, 2)) then dropout(p): one fused pass each way if it can, else torch's."""
    n, c, h, w = x.shape
    keep = _keep_below(p)
    fused = (
        allow_fused
        and (x.device.type, x.dtype, h % 2, w % 2) == ("cpu", torch.float32, 0, 0)
        and x.is_contiguous(memory_format=torch.channels_last)
        and keep is not None
        and _pool_kernels() is not None
    )
    if not fused:
        return _relu_dropout(F.max_pool2d(x, 2), p, generator)
    if generator is None or p == 0.0:
        return _PoolReluDropout.apply(x, None, 256, 1.0)
    rnd = _random_bytes(n * c * h * w // 4, generator).view(n, h // 2, w // 2, c)
    return _PoolReluDropout.apply(x, rnd, keep, 1.0 / (1.0 - p))


class CNN(nn.Module):
    """The reference CNN, channels_last, Glorot-uniform kernels and zero biases as in Keras.

    `forward(x, dropout=generator)` trains with dropout masks drawn from that generator;
    `forward(x)` is the evaluation pass (no dropout), as Keras's training flag.
    Flatten uses Keras's (height, width, channel) order, which channels_last gives for free.
    `fused_pool = False` swaps the Numba pooling kernels for torch's ops: the same results, bit
    for bit, only slower (for benchmarks and machines without Numba).
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
        self.fused_pool = True

    def forward(self, x: torch.Tensor, dropout: torch.Generator | None = None) -> torch.Tensor:
        spec = self.spec
        x = x.contiguous(memory_format=torch.channels_last)  # a no-op for 1-channel images
        x = F.relu(self.conv1(x), inplace=True)  # conv backward needs its input, not its output
        # Pool before ReLU: relu commutes with max, and the ReLU then sees a 4x smaller tensor.
        x = _pool_relu_dropout(self.conv2(x), spec.dropout1, dropout, self.fused_pool)
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # NHWC order, a view in channels_last
        x = _relu_dropout(self.fc1(x), spec.dropout2, dropout)
        return self.fc2(x)


def loss_accuracy(
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
    device = next(model.parameters()).device
    # Two streams so changing the batch size does not change the dropout masks' source order.
    # The shuffle is drawn on the CPU (the same order on every device); masks where they are used.
    shuffle_gen = torch.Generator().manual_seed(seed)
    dropout_gen = torch.Generator(device=device).manual_seed(seed + 0x5EED)
    return fit_epochs(
        model, optimizer, lambda idx: F.cross_entropy(model(x[idx], dropout=dropout_gen), y[idx]),
        lambda: loss_accuracy(model, *val, batch_size=eval_batch), n=len(y),
        batch_size=batch_size, epochs=max_epochs, patience=patience, shuffle=shuffle_gen,
        start=start, lower_is_better=monitor == "val_loss", schedule=schedule, deadline=deadline)
