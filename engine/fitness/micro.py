"""The micro tier's scorer: many candidates, all their lr scales, one stacked training per task.

A micro-tier score is a small MLP's validation accuracy after a fixed number of optimizer steps
(best epoch's weights, as the quick tier keeps them). Every (candidate, lr scale) is a member of
one population-batched training (engine.tasks.batched) whose update is the IR interpreter
(kernels.interp): no program is compiled, so a candidate seen once costs its share of one
stacked forward/backward and one interpreter call a step. A diverging member is frozen by the
batched trainer and scores 0.0 without touching the others.

The micro tasks are small on purpose (their job is to rank, not to reach a good accuracy), and
they are measured against the quick tier's fitness by bench/calibrate_tiers.py: see
BENCHMARKS.md, "Tier agreement", for the figures that chose the defaults.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from codegen.bytecode import assemble
from codegen.ir import STATES, Program
from engine.tasks.batched import ArenaViews, Member, train_batch
from engine.tasks.compare_tasks import MLPSpec
from engine.tasks.training import ModelSpec

__all__ = ["MAX_BATCH", "MICRO_TASKS", "InterpUpdate", "MicroTask", "micro_data", "score_micro"]

# Members per stacked training: past ~64 the stacked MLPs' per-member time no longer falls
# (bench/bench_tiers.py), and a larger batch holds more memory for the same throughput.
MAX_BATCH = 64


class InterpUpdate:
    """The batched trainer's update (engine.tasks.batched.MemberUpdate) by the IR interpreter:
    one `kernels.interp.Batch` over the arena's rows, rebuilt at step 0 (a new training starts
    every uniform state at 0). Any program, no compile."""

    def __init__(self, programs: Sequence[Program]) -> None:
        self.programs = list(programs)
        kinds = [assemble(p).tensor_states for p in self.programs]
        self.tensor_states = tuple(s for s in STATES if any(s in k for k in kinds))
        self.batch = None

    def __call__(self, arena: ArenaViews, lrs: np.ndarray, step: int,
                 active: np.ndarray) -> None:
        from kernels.interp import Batch  # the engine reaches kernels only where it trains

        k, row = arena.weight.shape
        if step == 0 or self.batch is None:
            self.batch = Batch(self.programs, [j * row for j in range(k)], [row] * k, lrs)
        self.batch.lr[:] = lrs
        self.batch.step(arena.weight.reshape(-1), arena.grad.reshape(-1),
                        *(arena.states[s].reshape(-1) if s in arena.states else None
                          for s in STATES), active=active)


@dataclass(frozen=True)
class MicroTask:
    """A micro-tier task: an MLP, its batch size, and where its data comes from (`source`:
    "digits"; "fashion28": the quick preset's first training chunk and validation images,
    flattened; "fashion14": the same down-sampled to 14x14 by 2x2 averages; "fashion14-images":
    those as (N, 1, 14, 14) images, for a CNN)."""

    name: str
    spec: MLPSpec | ModelSpec
    batch_size: int
    source: str


# The micro tier's default (DEFAULT_TIERS) is the first: measured against the quick tier by
# bench/calibrate_tiers.py (BENCHMARKS.md, "Tier agreement"), which also tries others.
MICRO_TASKS: dict[str, MicroTask] = {
    "fashion28-deep": MicroTask("fashion28-deep", MLPSpec(784, (64, 32)), 100, "fashion28"),
    "fashion28-mlp": MicroTask("fashion28-mlp", MLPSpec(784, (32,)), 100, "fashion28"),
    "fashion14-mlp": MicroTask("fashion14-mlp", MLPSpec(196, (32,)), 100, "fashion14"),
    "digits-mlp": MicroTask("digits-mlp", MLPSpec(64, (32,)), 32, "digits"),
}


@functools.lru_cache(maxsize=4)
def micro_data(source: str, seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                                tuple[torch.Tensor, torch.Tensor]]:
    """(train, val) of a micro task's source for split seed `seed` (cached per process)."""
    if source == "digits":
        from engine.tasks.compare_tasks import get_task, train_val

        splits = train_val(get_task("digits"), seed)
        return splits.train, splits.val
    if source in ("fashion14", "fashion28", "fashion14-images"):
        from engine.tasks.protocol import get_task, prepare

        data = prepare(get_task("quick"), seed, device="cpu")
        pool = 1 if source == "fashion28" else 2
        flat = source != "fashion14-images"

        def small(pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            x = F.avg_pool2d(pair[0], pool)
            return (x.reshape(len(pair[1]), -1) if flat else x).contiguous(), pair[1]
        return small(data.chunks[0]), small(data.val)
    raise ValueError(f"unknown micro data source {source!r}: use 'digits', 'fashion28', "
                     "'fashion14' or 'fashion14-images'")


def score_micro(tasks: Sequence[str], steps: int, jobs: Sequence[tuple[str, float]], *,
                seed: int = 0, max_batch: int = MAX_BATCH) -> list[float]:
    """The micro score of each job (program text, lr scale): its validation accuracy after
    `steps` optimizer steps, averaged over `tasks` (names in MICRO_TASKS); 0.0 for a job whose
    training failed (diverged). The lr scale is the member's `lr` (ALR programs carry their step
    size as a constant and are evaluated at lr 1). Members train at most `max_batch` at a time,
    a candidate's lr scales always in the same batch."""
    if steps < 1:
        raise ValueError(f"a micro tier needs at least 1 step, got {steps}")
    unknown = [t for t in tasks if t not in MICRO_TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown micro task(s) {unknown or tasks}: choose from "
                         f"{', '.join(MICRO_TASKS)}")
    parsed = {text: Program.parse(text) for text, _ in jobs}
    members = [Member(parsed[text], float(scale)) for text, scale in jobs]
    totals = np.zeros(len(members))
    for name in tasks:
        task = MICRO_TASKS[name]
        train, val = micro_data(task.source, seed)
        epochs = math.ceil(steps * task.batch_size / len(train[1]))
        for index in _batches([text for text, _ in jobs], max_batch):
            group = [members[i] for i in index]
            results = train_batch(task.spec, group, train, val, init_seed=seed, seed=seed,
                                  batch_size=task.batch_size, max_epochs=epochs,
                                  patience=epochs, max_steps=steps,
                                  update=InterpUpdate([m.program for m in group]))
            totals[index] += [r.accuracy for r in results]
    return (totals / len(tasks)).tolist()


def _batches(texts: Sequence[str], max_batch: int) -> list[list[int]]:
    """Job indices in batches of at most `max_batch` (more only for a candidate with more lr
    scales than that), every candidate's jobs in one batch: its lr scales train side by side."""
    by_text: dict[str, list[int]] = {}
    for i, text in enumerate(texts):
        by_text.setdefault(text, []).append(i)
    batches: list[list[int]] = [[]]
    for index in by_text.values():
        if batches[-1] and len(batches[-1]) + len(index) > max_batch:
            batches.append([])
        batches[-1].extend(index)
    return [b for b in batches if b]
