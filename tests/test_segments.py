"""Every backend's `kernel_segments` (one launch, per-segment lr and uniform states) against the
same backend's `kernel` run on each segment alone, and the numba one against the reference.

Held bit for bit to the per-segment kernel: the segmented launch changes only where the scalars
come from, never the arithmetic, so any difference is a bug (a wrong row, a wrong scalar order).
The per-segment kernel is itself held to the reference by tests/test_backends.py; the reference
check here covers the decay and float64 variants' scalar rows, which that chain would not show.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import kernels
from codegen import backends
from codegen.ir import STATES, Program, reference_step
from kernels import zoo
from numerics import close
from randprog import random_inputs, random_program

BACKENDS = tuple(backends.BACKENDS)
# Segment lengths: empty, shorter than a block, across a Triton block (1024), with gaps between.
LENGTHS = (5, 0, 37, 1030, 1, 64)
LRS = (1e-3, 0.5, -0.25, 0.0, 3.0, 1e-2)


def _layout() -> np.ndarray:
    rows, start = [], 0
    for n in LENGTHS:
        start += 3  # a gap the launch must leave alone
        rows.append((start, start + n))
        start += n
    return np.array(rows, np.int64)


def _programs() -> list[Program]:
    rng = random.Random(7)
    return [zoo.adam(), zoo.sgd(), zoo.rmsprop(), *(random_program(rng, 5) for _ in range(5))]


def _run(kernel, segments: np.ndarray, steps: int, seed: int, one_launch: bool,
         dtype: torch.dtype = torch.float32, decays: tuple[float, ...] = ()
         ) -> dict[str, np.ndarray]:
    """`steps` updates of every segment from the same seeded inputs: one kernel_segments launch
    a step, or one `kernel` call per segment; returns the buffers."""
    spec = backends.get(kernel.backend)
    rng = np.random.default_rng(seed)
    total = int(segments[-1, 1]) + 3
    real = getattr(torch, kernel.plan.compute_dtype)
    weight = torch.from_numpy(random_inputs(rng, total)).to(dtype)
    states = {s: torch.zeros(total, dtype=real) for s in kernel.tensor_states}
    scalars = [{} for _ in segments]
    for _ in range(steps):
        grad = torch.from_numpy(random_inputs(rng, total)).to(dtype)
        scalars = [kernel.advance_scalars(old, lr) for old, lr in zip(scalars, LRS)]
        rows = [[lr, *(new[s] for s in kernel.scalar_states), *decays[j:j + 1]]
                for j, (lr, new) in enumerate(zip(LRS, scalars))]
        if one_launch:
            buffers = [weight, grad, *(states[s] for s in kernel.tensor_states)]
            table = torch.tensor(rows, dtype=real)
            bounds = torch.from_numpy(segments)
            if spec.host is not None:
                buffers = [spec.host(b) for b in buffers]
                table, bounds = table.numpy(), segments
            kernel.module.kernel_segments(bounds, table, *buffers)
        else:
            for j, (start, end) in enumerate(segments.tolist()):
                if end > start:
                    kernel(weight[start:end], grad[start:end],
                           {s: states[s][start:end] for s in kernel.tensor_states},
                           LRS[j], scalars[j], *decays[j:j + 1])
    return {"weight": weight.float().numpy(), **{s: t.numpy() for s, t in states.items()}}


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_launch_equals_each_segment_alone_bit_for_bit(backend):
    segments = _layout()
    for i, program in enumerate(_programs()):
        kernel = kernels.compile(program, backend)
        one = _run(kernel, segments, 3, i, one_launch=True)
        alone = _run(kernel, segments, 3, i, one_launch=False)
        for name, value in alone.items():
            assert np.array_equal(one[name], value, equal_nan=True), (backend, name, program)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if "float64" in backends.get(b).dtypes])
def test_decay_and_float64_rows(backend):
    """A decay plan's last scalar and a float64 plan's table dtype reach the right segments."""
    segments = _layout()
    decays = tuple(1.0 - 0.1 * j for j in range(len(LENGTHS)))
    for dtype in (torch.float32, torch.float64):
        kernel = kernels.compile(zoo.adam(), backend, decay=True, dtype=dtype)
        one = _run(kernel, segments, 2, 3, True, dtype, decays)
        alone = _run(kernel, segments, 2, 3, False, dtype, decays)
        for name, value in alone.items():
            assert np.array_equal(one[name], value, equal_nan=True), (backend, dtype, name)


def test_numba_segments_follow_the_reference():
    """Each segment's weight after one launch is the float32 reference step at its own lr."""
    segments = _layout()
    program = zoo.adam().canonical()
    kernel = kernels.compile(program, "numba")
    rng = np.random.default_rng(0)
    total = int(segments[-1, 1]) + 3
    weight, grad = rng.standard_normal((2, total)).astype(np.float32)
    states = {s: np.zeros(total, np.float32) for s in kernel.tensor_states}
    new = [kernel.advance_scalars({}, lr) for lr in LRS]
    table = np.array([[lr, *(n[s] for s in kernel.scalar_states)] for lr, n in zip(LRS, new)],
                     np.float32)
    got = weight.copy()
    kernel.module.kernel_segments(segments, table, got, grad,
                                  *(states[s] for s in kernel.tensor_states))
    for j, (start, end) in enumerate(segments.tolist()):
        state = {s: np.zeros(end - start, np.float32) for s in STATES}
        state.update({s: np.float32(0.0) for s in kernel.scalar_states})
        ref, _ = reference_step(program, weight[start:end], grad[start:end], state, LRS[j])
        assert close(got[start:end], ref, 1e-5).all(), j
    gaps = np.ones(total, bool)
    for start, end in segments.tolist():
        gaps[start:end] = False
    assert np.array_equal(got[gaps], weight[gaps])  # nothing outside the segments moved
