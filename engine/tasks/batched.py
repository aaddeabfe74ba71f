"""Population-batched training: K candidates with one architecture trained as one stacked model.

Why: at the micro tier a candidate's training is a few hundred steps of a tiny model, where the
per-step overhead (Python, dispatch, small GEMMs) dominates the arithmetic. Stacking K MLP members
turns K small passes into one `bmm` per layer (measured faster here than `torch.func.vmap` over
`functional_call`). The CNN is compute bound in its convolutions on this CPU, and neither a
grouped convolution nor vmap was faster than K separate ones, so its members run their own layers
in one loop that shares the data, the dropout masks and the bookkeeping (see `_cnn_forward`).

Layout: one flat arena per buffer (weight, grad, each tensor state) of shape (K, P): row k is
member k's parameters, contiguous, in `model.parameters()` order and memory layout, so a
per-member update kernel (or an interpreter) runs on a plain 1-D slice. The stacked parameters
the forward pass reads are strided views (K, *shape) of the weight arena: the kernels write where
the forward reads.

What "the same as alone" means here (tests/test_batched.py holds it):
- Initial weights: member k is `spec.build(init_seed_k)`, built by the one-model code and copied
  in, so bit for bit what it gets alone.
- Data order and dropout masks: ONE shuffle and dropout stream for the whole batch, drawn exactly
  as `engine.tasks.training.fit` draws them for that seed, and shared by every member (a dropout mask of
  one member's shape used by all). That is what makes stacking possible, and it is also what a
  fair comparison of optimizers wants: every candidate sees the same minibatches and masks, as
  one-at-a-time evaluation already does (the training seed depends on the run seed, not on the
  candidate).
- Arithmetic: the update is each member's own kernel on its own slice. The CNN's members run the
  one-model ops on the one-model layouts: bit for bit what they are alone. The MLP's batched GEMMs
  add their products in another order than `nn.Linear`'s: within float32 reduction-order noise
  (measured on digits, 5 epochs: weights within 4e-7 of the one-model run, same accuracies).
- Divergence: a member whose training loss is not finite is frozen at once (no more updates, its
  loss left out of the summed loss whose gradient drives the others), with the reason text the
  one-at-a-time trainer gives. Members are independent blocks of the stacked computation (no sum
  crosses members), so a frozen member's NaNs never reach another member's numbers.

Measured (one thread, forward + backward per step, a shared 2-core machine): MLP 64-32-10 at
batch 32, K=32: 16.9 ms one at a time, 2.1 ms stacked with bmm, 3.0 ms with vmap; MLP 196-64-10
at batch 100, K=32: 34.8 / 9.6 / 12.4 ms. Quick CNN (16/32/64) at batch 100, K=8: 546 ms one at a
time, 612 ms with grouped convolutions, 1047 ms with vmap. Whole trainings: bench/bench_batched.py.

Public API: `Member`, `StackedModel`, `MemberUpdate` (the update interface), `KernelUpdate` (the
generated kernels behind it), `fit_batched`, `evaluate_batched`, `train_batch`, `BatchResult`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from codegen.ir import STATES, Program, evaluate
from engine.tasks.heldout import MLPSpec
from engine.tasks.training import (FitResult, ModelSpec, _keep_below, _pool_kernels, _PoolReluDropout,
                             _random_bytes, _ReluDropout, _scaled_mask)

__all__ = ["ArenaViews", "BatchResult", "KernelUpdate", "Member", "MemberUpdate", "StackedModel",
           "evaluate_batched", "fit_batched", "train_batch"]

ALIGN = 16  # each member's row starts on a 64-byte boundary: cache lines, vector loads
TENSOR_STATES = STATES  # every state a program may keep per element
CHAIN = 64  # uniform-state steps worked out per memo miss (see KernelUpdate._advance)


@dataclass(frozen=True)
class Member:
    """One member of a batch: a program at one learning-rate scale, the value of its `lr` (a
    program that never reads `lr` gets its weight update scaled by it: the project's rule, applied
    by the kernel's lowering)."""

    program: Program
    lr: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.program, str):
            object.__setattr__(self, "program", Program.parse(self.program))
        if not isinstance(self.program, Program):
            raise TypeError(f"Member.program must be a Program or its text, not "
                            f"{type(self.program).__name__}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"Member.lr must be a finite number >= 0, got {self.lr!r}")


# --- the stacked model ------------------------------------------------------------------------


class StackedModel:
    """K models of one spec (`MLPSpec` or the CNN's `ModelSpec`) as one, over a (K, P) arena.

    `weight` is the arena (K, P); `leaves` the stacked parameters (K, *shape), strided views of it
    that autograd differentiates; `forward(x, dropout)` gives logits (K, B, classes) for a batch
    `x` every member sees.
    """

    def __init__(self, spec: MLPSpec | ModelSpec, init_seeds: Sequence[int]) -> None:
        if not isinstance(spec, (MLPSpec, ModelSpec)):
            raise TypeError(f"StackedModel stacks an MLPSpec or a ModelSpec, not "
                            f"{type(spec).__name__}")
        if len(init_seeds) < 1:
            raise ValueError("StackedModel needs at least one member (init_seeds is empty)")
        self.spec, self.k = spec, len(init_seeds)
        models = [spec.build(int(s)) for s in init_seeds]  # the one-model init code, sliced
        params = [list(m.parameters()) for m in models]
        self.shapes = [tuple(p.shape) for p in params[0]]
        # Each parameter keeps its one-model memory layout (the CNN's are channels_last): a
        # convolution picks its algorithm, and so its summation order, from the layouts.
        self.strides = [tuple(p.stride()) for p in params[0]]
        self.offsets, total = [], 0
        for shape in self.shapes:
            self.offsets.append(total)
            total += math.prod(shape)
        self.numel = total
        self.row = -(-total // ALIGN) * ALIGN
        self.weight = torch.zeros((self.k, self.row), dtype=torch.float32)
        self.leaves = [self._view(self.weight, i) for i in range(len(self.shapes))]
        with torch.no_grad():
            torch._foreach_copy_(self.leaves, [torch.stack([ps[i].detach() for ps in params])
                                               for i in range(len(self.shapes))])
        for leaf in self.leaves:
            leaf.requires_grad_(True)
        self.fused_pool = True  # False: torch's pooling ops (same results, slower)

    def _view(self, buffer: torch.Tensor, i: int) -> torch.Tensor:
        return buffer.as_strided((self.k, *self.shapes[i]), (self.row, *self.strides[i]),
                                 self.offsets[i])

    def grad_views(self, grad: torch.Tensor) -> list[torch.Tensor]:
        """The stacked parameters' places in a (K, P) gradient arena."""
        return [self._view(grad, i) for i in range(len(self.shapes))]

    def member_state(self, k: int) -> dict[str, torch.Tensor]:
        """Member k's weights as its one-model `state_dict` holds them (copies)."""
        names = [name for name, _ in self.spec.build(0).named_parameters()]
        return {name: leaf[k].detach().clone() for name, leaf in zip(names, self.leaves)}

    def forward(self, x: torch.Tensor, dropout: torch.Generator | None = None,
                active: np.ndarray | None = None) -> torch.Tensor:
        """Logits (K, B, classes). Members with `active[k]` False may skip their work (the CNN
        does): their logits are then meaningless but finite."""
        if isinstance(self.spec, MLPSpec):
            return _mlp_forward(self.leaves, x)
        return _cnn_forward(self.leaves, x, self.spec, dropout, self.fused_pool, active)

    __call__ = forward


def _linear(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(K, B, in) or a shared (B, in) -> (K, B, out): member k's `F.linear(h_k, w_k, b_k)`."""
    if h.dim() == 2:
        h = h.expand(w.shape[0], *h.shape)
    return torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))


def _mlp_forward(leaves: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = x.reshape(x.shape[0], -1)
    pairs = list(zip(leaves[0::2], leaves[1::2]))
    for w, b in pairs[:-1]:
        h = torch.relu(_linear(h, w, b))
    return _linear(h, *pairs[-1])


def _cnn_forward(leaves: list[torch.Tensor], x: torch.Tensor, spec: ModelSpec,
                 dropout: torch.Generator | None, fused: bool,
                 active: np.ndarray | None) -> torch.Tensor:
    """The reference CNN (`engine.tasks.training.CNN.forward`) for K members at once.

    Every layer runs per member, with the one-model ops: on this CPU the CNN is compute bound
    in its convolutions, and one grouped convolution (groups=K, conv2) or one K-times-wider
    conv1 measured no faster than K separate ones (their backward passes slower), and `bmm`
    for the small dense layers gains little. Per-member ops make a member bit-for-bit what it
    is alone, and let frozen members skip their work (zero logits). What the batch shares is
    the data, the dropout masks (drawn once at one member's size from the shared generator, in
    the one-model order) and the loop around them."""
    w1, b1, w2, b2, wf1, bf1, wf2, bf2 = leaves
    k, n = w1.shape[0], x.shape[0]
    x = x.contiguous(memory_format=torch.channels_last)
    train1 = dropout is not None and spec.dropout1 != 0.0
    keep = _keep_below(spec.dropout1)
    fused = fused and keep is not None and _pool_kernels() is not None
    size = spec.image_size - 4
    pooled = size // 2
    drawn = None
    if train1:
        if fused:
            drawn = _random_bytes(n * spec.conv2 * size * size // 4, dropout)
            drawn = drawn.view(n, pooled, pooled, spec.conv2)
        else:
            drawn = _scaled_mask(n * spec.conv2 * pooled * pooled, spec.dropout1, dropout)
            drawn = drawn.view(n, pooled, pooled, spec.conv2).permute(0, 3, 1, 2)
    mask2 = None
    if dropout is not None and spec.dropout2 != 0.0:
        mask2 = _scaled_mask(n * spec.dense, spec.dropout2, dropout).view(n, spec.dense)
    scale1, scale2 = 1.0 / (1.0 - spec.dropout1), 1.0 / (1.0 - spec.dropout2)
    logits = []
    for j in range(k):
        if active is not None and not active[j]:
            logits.append(x.new_zeros(n, spec.classes))
            continue
        h = F.relu(F.conv2d(x, w1[j], b1[j]), inplace=True)
        h = F.conv2d(h, w2[j], b2[j])
        if fused:
            h = _PoolReluDropout.apply(h, drawn, keep if train1 else 256,
                                       scale1 if train1 else 1.0)
        elif train1:
            h = _ReluDropout.apply(F.max_pool2d(h, 2), drawn, scale1)
        else:
            h = torch.relu(F.max_pool2d(h, 2))
        h = F.linear(h.permute(0, 2, 3, 1).reshape(n, -1), wf1[j], bf1[j])  # Keras's flatten
        h = torch.relu(h) if mask2 is None else _ReluDropout.apply(h, mask2, scale2)
        logits.append(F.linear(h, wf2[j], bf2[j]))
    return torch.stack(logits)


# --- the update -------------------------------------------------------------------------------


@dataclass
class ArenaViews:
    """What an update sees: (K, P) float32 numpy arrays sharing memory with the training arena.
    Row k of each is member k's contiguous slice; `states` holds every tensor state any member
    keeps, zero at the start."""

    weight: np.ndarray
    grad: np.ndarray
    states: dict[str, np.ndarray]


class MemberUpdate(Protocol):
    """One optimizer step for every active member, each by its own rule, in place.

    `tensor_states` names the (K, P) state buffers it needs. `step` counts from 0 (the update
    about to be applied); `active[k]` False means member k is frozen: leave its slice alone.
    Generated kernels (`KernelUpdate`) or an IR interpreter can sit behind it."""

    tensor_states: tuple[str, ...]

    def __call__(self, arena: ArenaViews, lrs: np.ndarray, step: int,
                 active: np.ndarray) -> None: ...


class KernelUpdate:
    """Each member's own compiled kernel (`kernels.compile(program, backend)`) on its row.

    Members with the same program share one launch over their rows whatever their lr and
    uniform states (the generated `kernel_segments`)."""

    def __init__(self, programs: Sequence[Program], backend: str = "numba") -> None:
        import kernels  # the engine reaches kernels only where it trains

        if backend != "numba":
            raise ValueError(f"KernelUpdate runs numba kernels on CPU arenas; got backend "
                             f"{backend!r}")
        self.kernels = [kernels.compile(p, backend) for p in programs]
        self.tensor_states = tuple(s for s in TENSOR_STATES
                                   if any(s in kn.tensor_states for kn in self.kernels))
        self.scalars = [dict.fromkeys(kn.scalar_states, 0.0) for kn in self.kernels]
        self._memo: dict[tuple, dict[str, float]] = {}

    def warm_up(self) -> None:
        """Compile each program's `kernel_segments` now, on a throwaway one-element segment."""
        for kn in {kn.hash: kn for kn in self.kernels}.values():
            one = [np.zeros(1, np.float32) for _ in range(2 + len(kn.tensor_states))]
            kn.module.kernel_segments(np.array([[0, 1]], np.int64),
                                      np.zeros((1, 1 + len(kn.scalar_states)), np.float32), *one)

    def _advance(self, k: int, lr: float) -> dict[str, float]:
        """Member k's uniform states (step counters) one step on, by the reference semantics
        (`Program.advance_uniform`). Memoised along a chain: a miss works out the next CHAIN
        steps, because a step counter is a new key every step and the reference walk costs
        ~0.15 ms (measured: a third of a K=32 MLP batch's time without the chain)."""
        kn, old = self.kernels[k], self.scalars[k]
        if not kn.scalar_states:
            return old
        key = (kn.hash, lr, tuple(old.values()))
        new = self._memo.get(key)
        if new is None:
            if len(self._memo) > 64 * CHAIN:
                self._memo.clear()
            program = kn.plan.program
            uniform = [(s, getattr(program, s)) for s in program.uniform_states()]
            env = {s: np.float32(0.0) for s in STATES}
            env.update({s: np.float32(v) for s, v in old.items()})
            env["lr"] = np.float32(lr)
            state = key
            with np.errstate(all="ignore"):
                for _ in range(CHAIN):
                    for s, delta in uniform:
                        env[s] = np.float32(env[s] - evaluate(delta, env))
                    values = {s: float(env[s]) for s in kn.scalar_states}
                    self._memo[state] = values
                    state = (kn.hash, lr, tuple(values.values()))
            new = self._memo[key]
        return new

    def __call__(self, arena: ArenaViews, lrs: np.ndarray, step: int,
                 active: np.ndarray) -> None:
        """One `kernel_segments` launch per distinct program: its active members' rows, each
        with its own lr and uniform states (a lr grid or a block of seeds costs one launch)."""
        if step == 0:  # a new training: every uniform state starts at 0, as the tensor ones do
            self.scalars = [dict.fromkeys(kn.scalar_states, 0.0) for kn in self.kernels]
        rows: dict[int, list[int]] = {}
        for k in np.flatnonzero(active):
            rows.setdefault(id(self.kernels[k]), []).append(int(k))
        row = arena.weight.shape[1]
        weight, grad = arena.weight.reshape(-1), arena.grad.reshape(-1)
        for members in rows.values():
            kn = self.kernels[members[0]]
            values = np.empty((len(members), 1 + len(kn.scalar_states)), np.float32)
            for j, k in enumerate(members):
                self.scalars[k] = new = self._advance(k, float(lrs[k]))
                values[j] = [lrs[k], *(new[s] for s in kn.scalar_states)]
            segments = np.array([(k * row, (k + 1) * row) for k in members], np.int64)
            kn.module.kernel_segments(segments, values, weight, grad,
                                      *(arena.states[s].reshape(-1) for s in kn.tensor_states))


# --- training ---------------------------------------------------------------------------------


def evaluate_batched(model: StackedModel, x: torch.Tensor, y: torch.Tensor,
                     batch_size: int = 1000, active: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Per member (mean cross-entropy, accuracy), as `engine.tasks.training.loss_accuracy` gives one model.
    Members with `active[k]` False get meaningless numbers (their work may be skipped)."""
    loss_sum = np.zeros(model.k)
    correct = np.zeros(model.k, dtype=np.int64)
    with torch.inference_mode():
        for start in range(0, len(y), batch_size):
            logits = model(x[start:start + batch_size], active=active)
            target = y[start:start + batch_size]
            loss_sum += _member_losses(model, logits, target, "sum").double().numpy()
            correct += (logits.argmax(2) == target).sum(1).numpy()
    n = max(len(y), 1)
    return loss_sum / n, correct / n


def _member_losses(model: StackedModel, logits: torch.Tensor, target: torch.Tensor,
                   reduction: str = "mean") -> torch.Tensor:
    """Each member's cross-entropy (K,), reduced as `reduction` says. The CNN's members take the
    one-model call (its sum order too: K calls are nothing next to its convolutions), so that
    its losses and gradients are bit for bit; the MLP's take one vectorised call (K small calls
    would cost as much as its whole step)."""
    if isinstance(model.spec, ModelSpec):
        return torch.stack([F.cross_entropy(member, target, reduction=reduction)
                            for member in logits])
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.repeat(model.k),
                           reduction="none").view(model.k, -1)
    return flat.mean(1) if reduction == "mean" else flat.sum(1)


@dataclass
class _Track:
    """One member's curves and verdict while the batch trains."""

    train_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_value: float | None = None
    best_epoch: int = -1
    best_weight: np.ndarray | None = None
    reason: str | None = None
    seconds: float = 0.0


def fit_batched(model: StackedModel, update: MemberUpdate, lrs: Sequence[float],
                train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                *, seed: int, batch_size: int, max_epochs: int, patience: int,
                max_steps: int | None = None, deadline: float | None = None,
                eval_batch: int = 1000) -> list[FitResult]:
    """`engine.tasks.training.fit` (monitor val_acc) for every member at once: one FitResult each.

    Each member stops on its own (patience, divergence) and is then frozen with its best epoch's
    weights restored; the batch ends when every member has stopped or after `max_epochs`.
    `max_steps` (not in the one-model trainer) ends training after that many optimizer steps;
    the partial epoch is then evaluated as the last one. A member's `seconds` is the batch's wall
    time until it stopped (shared, not its own)."""
    if min(batch_size, max_epochs, patience, eval_batch) < 1:
        raise ValueError("batch_size, max_epochs, patience and eval_batch must be >= 1, got "
                         f"{batch_size}, {max_epochs}, {patience}, {eval_batch}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 or None, got {max_steps}")
    lrs = np.asarray(lrs, dtype=np.float64)
    if lrs.shape != (model.k,):
        raise ValueError(f"lrs must hold one learning rate per member ({model.k}), got "
                         f"{lrs.shape[0] if lrs.ndim else 'a scalar'}")
    start = time.perf_counter()
    k = model.k
    grad = torch.zeros_like(model.weight)
    grad_views = model.grad_views(grad)
    arena = ArenaViews(model.weight.numpy(), grad.numpy(),
                       {s: np.zeros((k, model.row), np.float32) for s in update.tensor_states})
    x, y = train
    n = len(y)
    shuffle_gen = torch.Generator().manual_seed(seed)  # the one-model trainer's two streams
    dropout_gen = torch.Generator().manual_seed(seed + 0x5EED)
    tracks = [_Track() for _ in range(k)]
    active = np.ones(k, dtype=bool)
    steps = 0

    def stop(j: int, reason: str | None) -> None:
        active[j] = False
        tracks[j].reason = reason
        tracks[j].seconds = time.perf_counter() - start

    for epoch in range(max_epochs):
        if not active.any():
            break
        order = torch.randperm(n, generator=shuffle_gen)
        loss_sum = np.zeros(k)
        trained = active.copy()  # who this epoch's curves are for
        for first in range(0, n, batch_size):
            idx = order[first:first + batch_size]
            logits = model(x[idx], dropout=dropout_gen, active=active)
            losses = _member_losses(model, logits, y[idx])
            values = losses.detach().numpy().astype(np.float64)
            for j in np.flatnonzero(active & ~np.isfinite(values)):
                stop(j, f"diverged: training loss {float(values[j])} at epoch {epoch}, step "
                        f"{first // batch_size}")
                trained[j] = False
            if not active.any():
                break
            mask = torch.from_numpy(active)
            total = torch.where(mask, losses, torch.zeros(())).sum()
            grads = torch.autograd.grad(total, model.leaves)
            with torch.no_grad():
                torch._foreach_copy_(grad_views, list(grads))
            update(arena, lrs, steps, active.copy())
            steps += 1
            loss_sum[active] += values[active] * len(idx)
            if max_steps is not None and steps >= max_steps:
                break
            if deadline is not None and time.perf_counter() > deadline:
                for j in np.flatnonzero(active):
                    stop(j, f"timeout: deadline passed at epoch {epoch}, step "
                            f"{first // batch_size}")
                break
        done = trained & active
        if not done.any():
            continue
        val_loss, val_acc = evaluate_batched(model, *val, batch_size=eval_batch, active=done)
        for j in np.flatnonzero(done):
            t = tracks[j]
            t.train_loss.append(float(loss_sum[j] / n))
            t.val_acc.append(float(val_acc[j]))
            t.val_loss.append(float(val_loss[j]))
            if not math.isfinite(val_loss[j]):
                stop(j, f"diverged: validation loss {val_loss[j]} at epoch {epoch}")
            elif t.best_value is None or val_acc[j] > t.best_value:
                t.best_value, t.best_epoch = float(val_acc[j]), epoch
                t.best_weight = arena.weight[j].copy()
            elif epoch - t.best_epoch >= patience:
                stop(j, None)
        if max_steps is not None and steps >= max_steps:
            break
        if deadline is not None and time.perf_counter() > deadline:
            for j in np.flatnonzero(active):
                stop(j, f"timeout: deadline passed after epoch {epoch}")
    results = []
    for j, t in enumerate(tracks):
        if active[j]:
            t.seconds = time.perf_counter() - start
        if t.best_weight is not None:  # every member ends on its best epoch's weights
            arena.weight[j] = t.best_weight
        results.append(FitResult(
            epochs=len(t.val_acc), best_epoch=t.best_epoch, train_loss=tuple(t.train_loss),
            val_acc=tuple(t.val_acc), val_loss=tuple(t.val_loss),
            lr=(float(lrs[j]),) * len(t.val_acc), seconds=t.seconds, reason=t.reason))
    return results


@dataclass(frozen=True)
class BatchResult:
    """One member's training and score. `accuracy` is on the scoring set (`fitness`, or the
    validation set when none is given) with the best epoch's weights; 0.0 when it failed."""

    member: Member
    accuracy: float
    fit: FitResult

    @property
    def reason(self) -> str | None:
        return self.fit.reason


def train_batch(spec: MLPSpec | ModelSpec, members: Sequence[Member],
                train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                *, init_seed: int | Sequence[int], seed: int, batch_size: int, max_epochs: int,
                patience: int, fitness: tuple[torch.Tensor, torch.Tensor] | None = None,
                update: MemberUpdate | None = None, max_steps: int | None = None,
                deadline: float | None = None, eval_batch: int = 1000) -> list[BatchResult]:
    """Train `members` together and score each: what `engine.tasks.protocol._trial` does for one.

    `init_seed` is one model seed for all (the engine's rule: every candidate starts alike) or
    one per member. `update` defaults to each member's generated numba kernel (`KernelUpdate`);
    pass another `MemberUpdate` (an IR interpreter) to run without per-program compiles."""
    members = list(members)
    if not members:
        raise ValueError("train_batch needs at least one member")
    seeds = [init_seed] * len(members) if isinstance(init_seed, int) else list(init_seed)
    if len(seeds) != len(members):
        raise ValueError(f"init_seed gives {len(seeds)} seeds for {len(members)} members")
    model = StackedModel(spec, seeds)
    update = update if update is not None else KernelUpdate([m.program for m in members])
    fits = fit_batched(model, update, [m.lr for m in members], train, val, seed=seed,
                       batch_size=batch_size, max_epochs=max_epochs, patience=patience,
                       max_steps=max_steps, deadline=deadline, eval_batch=eval_batch)
    accuracy = evaluate_batched(model, *(fitness or val), batch_size=eval_batch)[1]
    return [BatchResult(m, 0.0 if f.reason is not None else float(a), f)
            for m, a, f in zip(members, accuracy, fits)]
