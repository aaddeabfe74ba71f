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
the forward reads. The arena lives where the training data does: on a GPU it is a CUDA tensor and
the update gets torch tensors (each member's Triton kernel, `KernelUpdate(..., "triton")`).

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

Public API: `Member`, `StackedModel` (from engine.tasks.stacked), `MemberUpdate` (the update
interface), `KernelUpdate` (the generated kernels behind it), `fit_batched`, `evaluate_batched`,
`train_batch`, `BatchResult`.
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

from codegen.ir import STATES, Program
from engine.tasks.compare_tasks import MLPSpec
from engine.tasks.stacked import StackedModel
from engine.tasks.training import FitResult, ModelSpec

__all__ = ["ArenaViews", "BatchResult", "KernelUpdate", "Member", "MemberUpdate", "StackedModel",
           "evaluate_batched", "fit_batched", "train_batch"]

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


# --- the update -------------------------------------------------------------------------------


@dataclass
class ArenaViews:
    """What an update sees: (K, P) float32 arrays sharing memory with the training arena: numpy
    arrays on the CPU, or torch tensors on the arena's device for an update whose `tensors` is
    True (Triton kernels, which run on CUDA). Row k of each is member k's contiguous slice;
    `states` holds every tensor state any member keeps, zero at the start."""

    weight: np.ndarray | torch.Tensor
    grad: np.ndarray | torch.Tensor
    states: dict[str, np.ndarray | torch.Tensor]


class MemberUpdate(Protocol):
    """One optimizer step for every active member, each by its own rule, in place.

    `tensor_states` names the (K, P) state buffers it needs. `step` counts from 0 (the update
    about to be applied); `active[k]` False means member k is frozen: leave its slice alone.
    Generated kernels (`KernelUpdate`) or an IR interpreter can sit behind it. An update with a
    true `tensors` attribute gets torch tensors (any device); one without, numpy arrays (CPU)."""

    tensor_states: tuple[str, ...]

    def __call__(self, arena: ArenaViews, lrs: np.ndarray, step: int,
                 active: np.ndarray) -> None: ...


class KernelUpdate:
    """Each member's own compiled kernel (`kernels.compile(program, backend)`) on its row.

    Members with the same program share one launch over their rows whatever their lr and
    uniform states (the generated `kernel_segments`). `backend` "numba" works on a CPU arena's
    numpy rows; "triton" on torch tensors: a CUDA arena (or a CPU one in Triton's interpreter)."""

    def __init__(self, programs: Sequence[Program], backend: str = "numba") -> None:
        import kernels  # the engine reaches kernels only where it trains

        if backend not in ("numba", "triton"):
            raise ValueError(f"KernelUpdate runs 'numba' kernels (CPU arenas) or 'triton' ones "
                             f"(CUDA arenas); got backend {backend!r}")
        self.tensors = backend == "triton"
        self.kernels = [kernels.compile(p, backend) for p in programs]
        self.tensor_states = tuple(s for s in TENSOR_STATES
                                   if any(s in kn.tensor_states for kn in self.kernels))
        self.scalars = [dict.fromkeys(kn.scalar_states, 0.0) for kn in self.kernels]
        self._memo: dict[tuple, dict[str, float]] = {}

    def warm_up(self, device: str | torch.device = "cpu") -> None:
        """Compile each program's `kernel_segments` now, on a throwaway one-element segment (on
        `device`: where the triton kernels will run)."""
        for kn in {kn.hash: kn for kn in self.kernels}.values():
            one = [np.zeros(1, np.float32) for _ in range(2 + len(kn.tensor_states))]
            segments = np.array([[0, 1]], np.int64)
            values = np.zeros((1, 1 + len(kn.scalar_states)), np.float32)
            if self.tensors:
                segments, values, *one = (torch.from_numpy(a).to(device)
                                          for a in (segments, values, *one))
            kn.module.kernel_segments(segments, values, *one)

    def _advance(self, k: int, lr: float) -> dict[str, float]:
        """Member k's uniform states (step counters) one step on, by the reference semantics
        (the kernel's `UniformStepper`). Memoised along a chain: a miss works out the next CHAIN
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
            state = key
            for values in kn.stepper.chain(old, lr, CHAIN):
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
            if self.tensors:  # the launch reads both where the arena is
                segments = torch.from_numpy(segments).to(weight.device)
                values = torch.from_numpy(values).to(weight.device)
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
            loss_sum += _member_losses(model, logits, target, "sum").double().cpu().numpy()
            correct += (logits.argmax(2) == target).sum(1).cpu().numpy()
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
    best_weight: np.ndarray | torch.Tensor | None = None
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
    run = _BatchRun(model, update, lrs, seed)
    for epoch in range(max_epochs):
        if not run.active.any():
            break
        loss_sum, trained = run.train_epoch(epoch, *train, batch_size, max_steps, deadline)
        done = trained & run.active
        if done.any():
            run.validate(epoch, loss_sum / len(train[1]), done, val, eval_batch, patience)
        if max_steps is not None and run.steps >= max_steps:
            break
        if deadline is not None and time.perf_counter() > deadline:
            for j in np.flatnonzero(run.active):
                run.stop(j, f"timeout: deadline passed after epoch {epoch}")
    return run.results()


class _BatchRun:
    """The state of one `fit_batched` call: the arena, the two random streams, each member's
    track and whether it still trains, and the step count."""

    def __init__(self, model: StackedModel, update: MemberUpdate, lrs: np.ndarray,
                 seed: int) -> None:
        self.model, self.update, self.lrs = model, update, lrs
        self.start = time.perf_counter()
        device = model.weight.device
        tensors = bool(getattr(update, "tensors", False))
        if device.type != "cpu" and not tensors:
            raise ValueError(f"{type(update).__name__} updates numpy rows of a CPU arena; a "
                             f"model on {device} needs an update on torch tensors, e.g. "
                             "KernelUpdate(programs, backend='triton')")
        self.grad = torch.zeros_like(model.weight)
        self.grad_views = model.grad_views(self.grad)
        states = {s: torch.zeros_like(model.weight) for s in update.tensor_states}
        self.arena = (ArenaViews(model.weight, self.grad, states) if tensors else
                      ArenaViews(model.weight.numpy(), self.grad.numpy(),
                                 {s: t.numpy() for s, t in states.items()}))
        # The one-model trainer's streams: the shuffle on the CPU (the same order on every
        # device), the dropout masks where they are used.
        self.shuffle_gen = torch.Generator().manual_seed(seed)
        self.dropout_gen = torch.Generator(device=device).manual_seed(seed + 0x5EED)
        self.tracks = [_Track() for _ in range(model.k)]
        self.active = np.ones(model.k, dtype=bool)
        self.steps = 0

    def stop(self, j: int, reason: str | None) -> None:
        self.active[j] = False
        self.tracks[j].reason = reason
        self.tracks[j].seconds = time.perf_counter() - self.start

    def train_epoch(self, epoch: int, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                    max_steps: int | None, deadline: float | None
                    ) -> tuple[np.ndarray, np.ndarray]:
        """One epoch's minibatches: each member's summed training loss, and who trained it."""
        model, active, n = self.model, self.active, len(y)
        order = torch.randperm(n, generator=self.shuffle_gen)
        loss_sum = np.zeros(model.k)
        trained = active.copy()  # who this epoch's curves are for
        for first in range(0, n, batch_size):
            idx = order[first:first + batch_size]
            logits = model(x[idx], dropout=self.dropout_gen, active=active)
            losses = _member_losses(model, logits, y[idx])
            values = losses.detach().cpu().numpy().astype(np.float64)
            for j in np.flatnonzero(active & ~np.isfinite(values)):
                self.stop(j, f"diverged: training loss {float(values[j])} at epoch {epoch}, "
                             f"step {first // batch_size}")
                trained[j] = False
            if not active.any():
                break
            mask = torch.from_numpy(active).to(losses.device)
            total = torch.where(mask, losses, losses.new_zeros(())).sum()
            grads = torch.autograd.grad(total, model.leaves)
            with torch.no_grad():
                torch._foreach_copy_(self.grad_views, list(grads))
            self.update(self.arena, self.lrs, self.steps, active.copy())
            self.steps += 1
            loss_sum[active] += values[active] * len(idx)
            if max_steps is not None and self.steps >= max_steps:
                break
            if deadline is not None and time.perf_counter() > deadline:
                for j in np.flatnonzero(active):
                    self.stop(j, f"timeout: deadline passed at epoch {epoch}, step "
                                 f"{first // batch_size}")
                break
        return loss_sum, trained

    def validate(self, epoch: int, train_loss: np.ndarray, done: np.ndarray,
                 val: tuple[torch.Tensor, torch.Tensor], eval_batch: int, patience: int) -> None:
        """Record the epoch of the members in `done`; keep a best epoch's weights, stop the
        diverged and the patient-out."""
        val_loss, val_acc = evaluate_batched(self.model, *val, batch_size=eval_batch, active=done)
        for j in np.flatnonzero(done):
            t = self.tracks[j]
            t.train_loss.append(float(train_loss[j]))
            t.val_acc.append(float(val_acc[j]))
            t.val_loss.append(float(val_loss[j]))
            if not math.isfinite(val_loss[j]):
                self.stop(j, f"diverged: validation loss {val_loss[j]} at epoch {epoch}")
            elif t.best_value is None or val_acc[j] > t.best_value:
                t.best_value, t.best_epoch = float(val_acc[j]), epoch
                row = self.arena.weight[j]
                t.best_weight = row.clone() if isinstance(row, torch.Tensor) else row.copy()
            elif epoch - t.best_epoch >= patience:
                self.stop(j, None)

    def results(self) -> list[FitResult]:
        """Every member on its best epoch's weights, and its FitResult."""
        out = []
        for j, t in enumerate(self.tracks):
            if self.active[j]:
                t.seconds = time.perf_counter() - self.start
            if t.best_weight is not None:
                self.arena.weight[j] = t.best_weight
            out.append(FitResult(
                epochs=len(t.val_acc), best_epoch=t.best_epoch, train_loss=tuple(t.train_loss),
                val_acc=tuple(t.val_acc), val_loss=tuple(t.val_loss),
                lr=(float(self.lrs[j]),) * len(t.val_acc), seconds=t.seconds, reason=t.reason))
        return out


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
    one per member. The stacked model lives where the training data does. `update` defaults to
    each member's generated kernel (`KernelUpdate`: numba on the CPU, triton on a GPU); pass
    another `MemberUpdate` (an IR interpreter) to run without per-program compiles."""
    members = list(members)
    if not members:
        raise ValueError("train_batch needs at least one member")
    seeds = [init_seed] * len(members) if isinstance(init_seed, int) else list(init_seed)
    if len(seeds) != len(members):
        raise ValueError(f"init_seed gives {len(seeds)} seeds for {len(members)} members")
    device = train[0].device
    model = StackedModel(spec, seeds, device=device)
    if update is None:
        update = KernelUpdate([m.program for m in members],
                              "numba" if device.type == "cpu" else "triton")
    fits = fit_batched(model, update, [m.lr for m in members], train, val, seed=seed,
                       batch_size=batch_size, max_epochs=max_epochs, patience=patience,
                       max_steps=max_steps, deadline=deadline, eval_batch=eval_batch)
    accuracy = evaluate_batched(model, *(fitness or val), batch_size=eval_batch)[1]
    return [BatchResult(m, 0.0 if f.reason is not None else float(a), f)
            for m, a, f in zip(members, accuracy, fits)]
