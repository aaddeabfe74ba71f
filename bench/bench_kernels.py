"""One update step of a generated kernel against the memory-bandwidth limit and fused Adam.

Why it matters: every candidate AutoLR evolves runs as one of these kernels, and an elementwise
update is memory-bound, so the honest yardstick is a kernel that moves the same bytes doing trivial
math. Rows (numba backend, CPU, flat float32 tensors, the raw kernel call with no optimizer around
it), per size (1M and 10M elements):

* the Adam program (reads weight, grad, m, v; writes weight, m, v) and ADES (reads weight, grad,
  y; writes weight, y);
* `torch.optim.Adam(fused=True)`'s step on one parameter of that size (same 7 arrays as Adam);
* the bandwidth limit: a numba prange kernel that reads and writes the same arrays in place with
  one add each (4 read / 3 written, and 3 / 2), and a torch copy of the same number of bytes; the
  faster of the two is the limit.

`extra_info` of the program rows: elements/s, GB/s (bytes the program must move), the fraction of
the bandwidth limit and the speedup over fused Adam (its time / ours; for ADES, a different
algorithm, the key says `different_algorithm`), from a second timing that
alternates ours with the peers round by round (best of 50 at 1M, 20 at 10M each), so that the
ratios compare runs that saw the same, often shared, machine. Run:

    .venv/bin/python -m pytest bench/bench_kernels.py --benchmark-only
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch

import kernels
from benchlib import peer_ratio_key
from codegen.ir import reference_step
from kernels import zoo

SIZES = {"1M": 1_000_000, "10M": 10_000_000}
# program -> (factory, arrays read, arrays written)
PROGRAMS = {"adam": (zoo.adam, 4, 3), "ades": (zoo.ades, 3, 2)}
LR = 1e-3
ROUNDS = {"1M": 50, "10M": 20}  # the minimum of many runs is the quiet-machine figure


@numba.njit(parallel=True, cache=True)
def _stream_4r3w(a, b, c, d):
    for i in numba.prange(a.shape[0]):
        x = b[i]
        a[i] = a[i] + x
        c[i] = c[i] + x
        d[i] = d[i] + x


@numba.njit(parallel=True, cache=True)
def _stream_3r2w(a, b, c):
    for i in numba.prange(a.shape[0]):
        x = b[i]
        a[i] = a[i] + x
        c[i] = c[i] + x


STREAMS = {(4, 3): _stream_4r3w, (3, 2): _stream_3r2w}


def small_values(n: int, seed: int) -> torch.Tensor:
    # Gradient-sized values: they keep every state normal (no NaN, no denormals) however many
    # times the benchmark repeats the step.
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 1e-3


def program_step(name: str, n: int):
    """The raw kernel call for one step of program `name` over n elements, checked once."""
    factory, _, _ = PROGRAMS[name]
    program = factory()
    kernel = kernels.compile(program, "numba")
    weight, grad = small_values(n, 1) * 100, small_values(n, 2)
    states = {s: torch.zeros(n) for s in kernel.tensor_states}
    scalars = kernel.advance_scalars({}, LR)
    # Correctness once, before any timing: the first 4096 elements against the reference.
    k = 4096
    ref_w, _ = reference_step(program, weight[:k].numpy(), grad[:k].numpy(), {}, LR)
    kernel(weight, grad, states, LR, scalars)
    np.testing.assert_allclose(weight[:k].numpy(), ref_w, rtol=1e-5)
    return lambda: kernel(weight, grad, states, LR, scalars)


def fused_adam_step(n: int):
    param = torch.nn.Parameter(small_values(n, 1) * 100)
    param.grad = small_values(n, 2)
    opt = torch.optim.Adam([param], lr=LR, fused=True)
    return opt.step


def stream_step(n: int, reads: int, writes: int):
    arrays = [small_values(n, i).numpy() for i in range(reads)]
    kernel = STREAMS[(reads, writes)]
    return lambda: kernel(*arrays)


def copy_step(n: int, reads: int, writes: int):
    # One copy moving (reads + writes) * n floats: half read, half written.
    src = small_values((reads + writes) * n // 2, 3)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


@pytest.fixture(scope="module")
def peers():
    """Peer step functions by (kind, n, reads, writes), built once per module run."""
    cache: dict[tuple, object] = {}

    def get(kind: str, n: int, reads: int = 4, writes: int = 3):
        key = (kind, n, reads, writes)
        if key not in cache:
            make = {"fused": lambda: fused_adam_step(n),
                    "stream": lambda: stream_step(n, reads, writes),
                    "copy": lambda: copy_step(n, reads, writes)}[kind]
            cache[key] = make()
        return cache[key]

    return get


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", PROGRAMS)
def test_program_kernel(benchmark, peers, interleaved, name, size):
    n = SIZES[size]
    _, reads, writes = PROGRAMS[name]
    step = program_step(name, n)
    benchmark.group = f"kernel step, {size} elements"
    benchmark.name = f"{name} program (numba)"
    benchmark.pedantic(step, rounds=ROUNDS[size], iterations=1, warmup_rounds=2)
    if benchmark.stats is None:  # --benchmark-disable
        return
    best = interleaved({"ours": step, "fused": peers("fused", n),
                        "stream": peers("stream", n, reads, writes),
                        "copy": peers("copy", n, reads, writes)}, repeat=ROUNDS[size])
    limit = min(best["stream"], best["copy"])
    nbytes = (reads + writes) * 4 * n
    benchmark.extra_info.update(
        elements_per_s=round(n / best["ours"]),
        GB_per_s=round(nbytes / best["ours"] / 1e9, 2),
        fraction_of_bandwidth_limit=round(limit / best["ours"], 3),
        bandwidth_limit_GB_per_s=round(nbytes / limit / 1e9, 2),
        **{peer_ratio_key(name, "fused"): round(best["fused"] / best["ours"], 3)})


@pytest.mark.parametrize("size", SIZES)
def test_fused_adam(benchmark, size):
    benchmark.group = f"kernel step, {size} elements"
    benchmark.name = "torch Adam(fused=True)"
    benchmark.pedantic(fused_adam_step(SIZES[size]), rounds=ROUNDS[size], iterations=1,
                       warmup_rounds=2)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("reads, writes", [(4, 3), (3, 2)])
@pytest.mark.parametrize("kind", ["numba stream", "torch copy"])
def test_bandwidth_limit(benchmark, kind, reads, writes, size):
    n = SIZES[size]
    make = stream_step if kind == "numba stream" else copy_step
    benchmark.group = f"kernel step, {size} elements"
    benchmark.name = f"limit: {kind} {reads}r/{writes}w"
    benchmark.pedantic(make(n, reads, writes), rounds=ROUNDS[size], iterations=1,
                       warmup_rounds=2)
    if benchmark.stats is not None:
        benchmark.extra_info["GB_per_s"] = round(
            (reads + writes) * 4 * n / benchmark.stats.stats.min / 1e9, 2)
