"""The IR interpreter (kernels.interp) against the generated fused Numba kernels it stands in for.

Why it matters: at the micro tier most candidates are trained once, for well under a second, so a
~0.1 s compile per program would dominate; the interpreter runs any program with no compile, at
some cost per step. These rows say how much, on one thread (evaluation workers run one):

* micro batch: one optimizer step of K=32 segments of a 64-32-10 MLP (2,410 parameters each;
  the ten zoo programs at several lrs), one interpreter call, against the same step as 32 calls
  of the generated kernels (each program's serial loop on its slice, the raw call the arena
  makes). `extra_info`: the interpreter's time over the kernels'.
* CNN segment: one step of Adam over 1.2M elements, the interpreter against the generated
  kernel, per chunk size (elements per pass; `whole` = registers as long as the segment).
* cold: the first step of a program never seen before: the interpreter's (assemble + step)
  against the generated kernel's (generate, compile, first call) in an empty kernel cache.

Ratios come from a second timing that alternates ours with the peer round by round
(bench/conftest.py), so both saw the same, often shared, machine. Run:

    .venv/bin/python -m pytest bench/bench_interp.py --benchmark-only
"""

from __future__ import annotations

import tempfile
import time

import numba
import numpy as np
import pytest

import kernels
from codegen.ir import STATES
from codegen.backends.numba import kernel_fn
from kernels import zoo
from kernels.interp import Batch

MLP = 64 * 32 + 32 + 32 * 10 + 10  # 2,410 parameters
K = 32
CNN = 1_200_000
LRS = (1e-3, 3e-3, 1e-2, 3e-2)
CHUNKS = {"256": 256, "512": 512, "1024": 1024, "4096": 4096, "whole": None}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The workers' setting: the generated kernels then take their serial loop."""
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(threads)


def arena(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    # Gradient-sized values keep every state normal however many times a step repeats.
    rng = np.random.default_rng(seed)
    out = {name: (rng.standard_normal(n) * 1e-3).astype(np.float32)
           for name in ("weight", "grad", *STATES)}
    out["sigma"][:] = np.abs(out["sigma"])  # second-moment states stay >= 0
    out["beta"][:] = np.abs(out["beta"])
    return out


def interp_step(programs, lengths, lrs, chunk: int | None):
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    buffers = arena(int(sum(lengths)))
    batch = Batch(programs, offsets, lengths, lrs, chunk=chunk or max(lengths))
    args = [buffers[n] for n in ("weight", "grad", *STATES)]
    return lambda: batch.step(*args)


def kernel_steps(programs, lengths, lrs):
    """The same step as one generated-kernel call per segment, uniform states advanced as the
    arena does (once per step, host side)."""
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    buffers = arena(int(sum(lengths)))
    calls = []
    for program, o, n, lr in zip(programs, offsets, lengths, lrs):
        kernel = kernels.compile(program, "numba")
        fn = kernel_fn(kernel.module)
        views = [buffers[b][o:o + n] for b in ("weight", "grad", *kernel.tensor_states)]
        scalars = kernel.advance_scalars({}, lr)
        calls.append((fn, views, [lr, *(scalars[s] for s in kernel.scalar_states)]))

    def step():
        for fn, views, values in calls:
            fn(*views, *values)
    return step


def micro_batch():
    names = list(zoo.ZOO)
    programs = [zoo.ZOO[names[k % len(names)]]() for k in range(K)]
    lrs = [LRS[(k // len(names)) % len(LRS)] for k in range(K)]
    return programs, [MLP] * K, lrs


@pytest.mark.parametrize("chunk", ["256", "512", "1024", "whole"])
def test_micro_batch(benchmark, interleaved, chunk):
    programs, lengths, lrs = micro_batch()
    ours = interp_step(programs, lengths, lrs, CHUNKS[chunk])
    benchmark.group = f"one step, {K} x {MLP}-parameter MLP segments (1 thread)"
    benchmark.name = f"interpreter, chunk {chunk}"
    benchmark.pedantic(ours, rounds=200, iterations=1, warmup_rounds=3)
    if benchmark.stats is None:
        return
    best = interleaved({"ours": ours, "kernels": kernel_steps(programs, lengths, lrs)},
                       repeat=200)
    benchmark.extra_info.update(seconds=best["ours"], generated_kernels_seconds=best["kernels"],
                                interpreter_over_kernels=round(best["ours"] / best["kernels"], 2))


def test_micro_batch_generated_kernels(benchmark):
    programs, lengths, lrs = micro_batch()
    benchmark.group = f"one step, {K} x {MLP}-parameter MLP segments (1 thread)"
    benchmark.name = f"generated kernels, {K} calls"
    benchmark.pedantic(kernel_steps(programs, lengths, lrs), rounds=200, iterations=1,
                       warmup_rounds=3)


@pytest.mark.parametrize("chunk", list(CHUNKS))
def test_cnn_segment(benchmark, interleaved, chunk):
    program = zoo.adam()
    ours = interp_step([program], [CNN], [1e-3], CHUNKS[chunk])
    benchmark.group = f"one Adam step, {CNN} elements (1 thread)"
    benchmark.name = f"interpreter, chunk {chunk}"
    benchmark.pedantic(ours, rounds=10, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:
        return
    best = interleaved({"ours": ours, "kernel": kernel_steps([program], [CNN], [1e-3])},
                       repeat=10)
    benchmark.extra_info.update(seconds=best["ours"], generated_kernel_seconds=best["kernel"],
                                interpreter_over_kernel=round(best["ours"] / best["kernel"], 2))


def test_cnn_segment_generated_kernel(benchmark):
    benchmark.group = f"one Adam step, {CNN} elements (1 thread)"
    benchmark.name = "generated kernel"
    benchmark.pedantic(kernel_steps([zoo.adam()], [CNN], [1e-3]), rounds=10, iterations=1,
                       warmup_rounds=1)


def new_programs():
    """An endless supply of Adam-sized programs nobody has compiled: beta1 moves each time."""
    i = 0
    while True:
        i += 1
        yield zoo.adam(betas=(0.9 - i * 1e-5, 0.999))


@pytest.fixture
def fresh_cache(monkeypatch):
    with tempfile.TemporaryDirectory() as root:
        monkeypatch.setenv("AUTOLR_CACHE", root)
        yield root


def test_cold_first_step(benchmark, fresh_cache):
    """A new program's first step over an MLP's parameters: the interpreter (assemble + step)
    against the generated kernel (emit, write, compile, first call). Both in this process, the
    interpreter's own loop already compiled (a worker's first batch pays that once: Numba's
    cache keeps it across processes)."""
    supply = new_programs()
    buffers = arena(MLP)
    args = [buffers[n] for n in ("weight", "grad", *STATES)]
    Batch([next(supply)], [0], [MLP], 1e-3).step(*args)  # the interpreter's one compile

    def interpreted():
        Batch([next(supply)], [0], [MLP], 1e-3).step(*args)

    def generated():
        kernel = kernels.compile(next(supply), "numba")
        views = [buffers[n] for n in ("weight", "grad", *kernel.tensor_states)]
        scalars = kernel.advance_scalars({}, 1e-3)
        kernel_fn(kernel.module)(*views, 1e-3, *(scalars[s] for s in kernel.scalar_states))

    benchmark.group = "first step of a new program (1 thread)"
    benchmark.name = "interpreter: assemble + step"
    benchmark.pedantic(interpreted, rounds=20, iterations=1)
    if benchmark.stats is None:
        return
    compiles = []
    for _ in range(5):
        start = time.perf_counter()
        generated()
        compiles.append(time.perf_counter() - start)
    benchmark.extra_info.update(
        interpreter_seconds=benchmark.stats.stats.min, generated_kernel_seconds=min(compiles),
        compile_over_interpreter=round(min(compiles) / benchmark.stats.stats.min))

