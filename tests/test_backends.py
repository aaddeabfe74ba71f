"""Every backend against the float32 reference evaluator: random programs, edge inputs, each op.

An element counts as *well-conditioned* when the float32 reference agrees with a float64 evaluation
of the same inputs (same class: finite/inf/NaN, and close). There, a backend must give the same
class and a close value. Elsewhere float32 rounding already decides the answer (cancellation,
overflow at the edge), so backends with other-but-valid rounding (exp/log ulps, Triton's pow from
exp2/log2) may legitimately differ; those elements are counted, and must stay a minority.
"""

from __future__ import annotations

import collections
import random

import numpy as np
import pytest
import torch

import kernels
from codegen import backends
from codegen.ir import STATES, Program, reference_step, walk, Call
from numerics import close
from randprog import EDGE_VALUES, random_inputs, random_program

BACKENDS = tuple(backends.BACKENDS)  # the registry's: a new backend is tested here too
HALF = tuple(b for b in BACKENDS if "float16" in backends.get(b).dtypes)
# Triton's exp/log/pow (exp2/log2 in the interpreter) round differently: a looser tolerance there.
RTOL = collections.defaultdict(lambda: 1e-4, {"triton": 1e-3})
N_PROGRAMS, CHUNKS, STEPS, N = 512, 16, 3, 96


def check_step(kernel, program, weight, grad, state, lr, scalars, backend):
    """One step from identical inputs; returns (well-conditioned count, ill count)."""
    ref_w, ref_s = reference_step(program, weight, grad, state, lr)
    ref64_w, ref64_s = reference_step(program, weight, grad, state, lr, dtype=np.float64)
    w = torch.from_numpy(weight.copy())
    tensors = {s: torch.from_numpy(np.asarray(state[s], np.float32).copy()) for s in kernel.tensor_states}
    kernel(w, torch.from_numpy(grad), tensors, lr, kernel.advance_scalars(scalars, lr))
    outputs = [("weight", w.numpy(), ref_w, ref64_w)]
    outputs += [(s, tensors[s].numpy(), ref_s[s], ref_s64) for s, ref_s64 in
                ((s, ref64_s[s]) for s in kernel.tensor_states)]
    good = ill = 0
    for name, got, ref32, ref64 in outputs:
        with np.errstate(over="ignore"):  # float64 values beyond float32 become inf: intended
            ref64_32 = ref64.astype(np.float32)
        conditioned = close(ref32, ref64_32, 1e-5)
        ok = close(got, ref32, RTOL[backend])
        bad = conditioned & ~ok
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            pytest.fail(f"{backend}: {name} differs from the reference at element {i}: got "
                        f"{got[i]!r}, reference {ref32[i]!r} (float64 {ref64[i]!r}); grad "
                        f"{grad[i]!r}, lr {lr}, state { {s: np.asarray(v).flat[i] if np.ndim(v) else v for s, v in state.items()} }\n"
                        f"program:\n{program}")
        good += int(conditioned.sum())
        ill += int((~conditioned).sum())
    return good, ill


def run_program(program: Program, backend: str, seed: int) -> tuple[int, int]:
    canonical = program.canonical()
    kernel = kernels.compile(canonical, backend)
    rng = np.random.default_rng(seed)
    weight = random_inputs(rng, N)
    state = {s: np.zeros(N, np.float32) for s in STATES}
    scalars: dict[str, float] = {}
    totals = np.zeros(2, int)
    for step in range(STEPS):
        grad = random_inputs(rng, N)
        lr = float(rng.choice([1.0, 0.01, -0.5, 0.0, 3.0]))
        # Scalar states hold one value for all elements: give the reference the same.
        ref_state = dict(state)
        for s in kernel.scalar_states:
            ref_state[s] = np.float32(scalars.get(s, 0.0))
        totals += check_step(kernel, canonical, weight, grad, ref_state, lr, scalars, backend)
        weight, new_state = reference_step(canonical, weight, grad, ref_state, lr)
        state = {s: np.broadcast_to(new_state[s], (N,)).astype(np.float32) for s in STATES}
        scalars = kernel.advance_scalars(scalars, lr)
    return tuple(totals)


def programs(chunk: int) -> list[Program]:
    rng = random.Random(1000 + chunk)
    return [random_program(rng, max_depth=6) for _ in range(N_PROGRAMS // CHUNKS)]


STATS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_random_programs_match_reference(backend, chunk):
    good = ill = 0
    for i, program in enumerate(programs(chunk)):
        g, b = run_program(program, backend, seed=chunk * 1000 + i)
        good, ill = good + g, ill + b
    assert good > 3 * ill, f"too few well-conditioned elements to judge: {good} vs {ill}"
    print(f"{backend} chunk {chunk}: {good} elements checked, {ill} ill-conditioned skipped")


def test_random_programs_cover_every_op_and_depth():
    ops, depths = collections.Counter(), collections.Counter()
    for chunk in range(CHUNKS):
        for p in programs(chunk):
            for target in ("alpha", "beta", "sigma", "weight"):
                expr = getattr(p, target)
                if expr is not None:
                    ops.update(n.op for n in walk(expr) if isinstance(n, Call))
                    from codegen.ir import depth
                    depths[depth(expr)] += 1
    from codegen.ir import ARITHMETIC_OPS
    assert set(ops) == set(ARITHMETIC_OPS)
    assert max(depths) == 6
    assert sum(len(programs(c)) for c in range(CHUNKS)) >= 500


def test_numba_serial_and_parallel_loops_agree_bit_for_bit():
    """The generated module has a threaded loop and a serial one (what one-thread workers run);
    the random programs above go through whichever this process picks, so the two are held to
    each other here: same inputs, same bits, on random programs over edge-heavy inputs."""
    rng = np.random.default_rng(7)
    for chunk in range(0, CHUNKS, 4):
        for program in programs(chunk)[:8]:  # 32 programs: each loop is a compile (~0.3-0.6 s)
            kernel = kernels.compile(program, "numba")
            n = 4096  # long enough for the vectorised loop and a scalar remainder
            weight, grad = random_inputs(rng, n), random_inputs(rng, n)
            states = [random_inputs(rng, n) for _ in kernel.tensor_states]
            lr = float(rng.choice([1.0, 0.01, -0.5]))
            scalars = [kernel.advance_scalars({}, lr)[s] for s in kernel.scalar_states]
            results = []
            for fn in (kernel.module.kernel, kernel.module.kernel_serial):
                buffers = [a.copy() for a in (weight, grad, *states)]
                fn(*buffers, lr, *scalars)
                results.append([b.view(np.uint32) for b in buffers])
            for a, b in zip(*results):
                # Bit for bit, except that a NaN's sign bit may differ (x86's vector and
                # scalar instructions make NaNs of either sign; no op reads that bit).
                nan = np.isnan(a.view(np.float32)) & np.isnan(b.view(np.float32))
                assert np.array_equal(a[~nan], b[~nan]), \
                    f"serial and parallel loops differ for\n{program}"


UNARY = ("neg", "square", "sqrt", "abs", "sign", "exp", "log")
BINARY = ("add", "sub", "mul", "div", "pow", "min", "max")
ULPS = {"exp": 4, "log": 4, "pow": 64}  # transcendental: implementations differ in the last bits


def run_edge(kernel, grad: np.ndarray, lr: float, chunk: int) -> np.ndarray:
    """The kernel over `grad` in pieces of `chunk` elements: short pieces take Numba's scalar
    loop, long ones its vectorised loop, and both must be right."""
    w = torch.zeros(len(grad))
    for i in range(0, len(grad), chunk):
        kernel(w[i:i + chunk], torch.from_numpy(grad[i:i + chunk]), {}, lr)
    return w.numpy()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", UNARY + BINARY)
def test_each_op_on_edge_inputs(backend, op):
    """Every op on every pair of edge values (zeros, -0, div by zero, sqrt and pow of negatives,
    integer exponents, huge, tiny, inf, NaN), in both operand orders via grad and lr."""
    grad = np.tile(EDGE_VALUES, 2)
    texts = [f"weight: {op}(grad)"] if op in UNARY else [f"weight: {op}(grad, lr)",
                                                         f"weight: {op}(lr, grad)"]
    rtol = ULPS.get(op, 0) * 6e-8 or 1e-9
    for text in texts:
        program = Program.parse(text)
        kernel = kernels.compile(program, backend)
        for lr in (EDGE_VALUES if op in BINARY else EDGE_VALUES[:1]):
            if backend == "triton" and lr == 0 and np.signbit(lr):
                continue  # Triton's interpreter passes a -0.0 scalar argument as +0.0
            ref, _ = reference_step(program, np.zeros(len(grad), np.float32), grad, {}, float(lr))
            for chunk in ((len(grad), 3) if backend == "numba" else (len(grad),)):
                got = run_edge(kernel, grad, float(lr), chunk)
                ok = close(got, ref, rtol) | (got == ref)
                assert ok.all(), (f"{backend} {text} lr={lr!r} (pieces of {chunk}): grad "
                                  f"{grad[~ok]} got {got[~ok]} want {ref[~ok]}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sign_of_negative_zero_is_positive_zero(backend):
    """sign(-0) is +0 (numpy's answer, the reference's). The edge test cannot see a zero's sign
    (its weights start at 0 and it compares values), so the sign shows through pow(., -1) here:
    pow(+0, -1) = +inf, pow(-0, -1) = -inf."""
    program = Program.parse("weight: pow(sign(grad), -1.0)")
    grad = np.array([-0.0, 0.0, -2.0, 3.0], np.float32)
    ref, _ = reference_step(program, np.zeros(4, np.float32), grad, {}, 1.0)
    assert list(ref) == [-np.inf, -np.inf, 1.0, -1.0]  # weight - (+inf), twice
    got = run_edge(kernels.compile(program, backend), grad, 1.0, len(grad))
    assert list(got) == list(ref), got


# ---- kernel options (maximize, weight decay) and parameter dtypes -------------------------------
# The same random programs, fewer of them (each option set is its own compile), each backend held
# to the reference evaluated on what the option means: the gradient negated, the weight multiplied
# by the float32-rounded decay factor first, or every input in float64.

OPTION_PROGRAMS = 24


def option_programs() -> list[Program]:
    return [p for chunk in range(0, CHUNKS, 8) for p in programs(chunk)[:OPTION_PROGRAMS // 2]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_programs_with_maximize_and_weight_decay_match_reference(backend):
    good = ill = 0
    for i, program in enumerate(option_programs()):
        canonical = program.canonical()
        kernel = kernels.compile(canonical, backend, maximize=True, decay=True)
        rng = np.random.default_rng(5000 + i)
        weight, grad = random_inputs(rng, N), random_inputs(rng, N)
        lr, decay = float(rng.choice([1.0, 0.01, 3.0])), float(rng.choice([0.999, 0.5, 1.0]))
        state = {s: random_inputs(rng, N) for s in STATES}
        for s in kernel.scalar_states:
            state[s] = np.float32(0.0)
        w = torch.from_numpy(weight.copy())
        tensors = {s: torch.from_numpy(state[s].copy()) for s in kernel.tensor_states}
        kernel(w, torch.from_numpy(grad), tensors, lr, kernel.advance_scalars({}, lr), decay)
        # The option's meaning, written out: decay the weight in float32, negate the gradient.
        decayed = (weight * np.float32(decay)).astype(np.float32)
        ref32, ref32_s = reference_step(canonical, decayed, -grad, state, lr)
        ref64, ref64_s = reference_step(canonical, decayed, -grad, state, lr, dtype=np.float64)
        outputs = [(w.numpy(), ref32, ref64)]
        outputs += [(tensors[s].numpy(), ref32_s[s], ref64_s[s]) for s in kernel.tensor_states]
        for got, r32, r64 in outputs:
            with np.errstate(over="ignore"):
                conditioned = close(r32, r64.astype(np.float32), 1e-5)
            bad = conditioned & ~close(got, r32, RTOL[backend])
            assert not bad.any(), (f"{backend}: element {np.flatnonzero(bad)[0]} differs, "
                                   f"program:\n{canonical}")
            good, ill = good + int(conditioned.sum()), ill + int((~conditioned).sum())
    assert good > 3 * ill


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_programs_compute_in_float64_for_float64_parameters(backend):
    """float64 kernels against the float64 reference, held to 1e-9 where float32 arithmetic
    would only reach 1e-5: the math, the states and the scalars are float64."""
    checked = 0
    for i, program in enumerate(option_programs()):
        canonical = program.canonical()
        kernel = kernels.compile(canonical, backend, dtype=torch.float64)
        rng = np.random.default_rng(7000 + i)
        weight, grad = (random_inputs(rng, N).astype(np.float64) for _ in range(2))
        weight += rng.standard_normal(N) * 1e-10  # values float32 cannot hold
        lr = float(rng.choice([1.0, 0.01, 3.0])) + 1e-12
        state = {s: random_inputs(rng, N).astype(np.float64) for s in STATES}
        for s in kernel.scalar_states:
            state[s] = np.float64(np.float32(kernel.advance_scalars({}, lr)[s]))
        w = torch.from_numpy(weight.copy())
        tensors = {s: torch.from_numpy(state[s].copy()) for s in kernel.tensor_states}
        scalars = {s: float(state[s]) for s in kernel.scalar_states}
        kernel(w, torch.from_numpy(grad), tensors, lr, scalars)
        assert w.dtype == torch.float64
        # The kernel receives the uniform states' new values; the reference advances them
        # itself, so it starts them one step back (their update is exact for these programs:
        # compare only where the reference reproduces the scalars given).
        old = dict(state)
        for s in kernel.scalar_states:
            old[s] = np.float64(0.0)
        ref64, ref64_s = reference_step(canonical, weight, grad, old, lr, dtype=np.float64)
        if any(not np.array_equal(np.broadcast_to(ref64_s[s], (N,)),
                                  np.full(N, state[s]), equal_nan=True)
               for s in kernel.scalar_states):
            continue
        ref32, _ = reference_step(canonical, weight.astype(np.float32), grad.astype(np.float32),
                                  {s: np.asarray(v).astype(np.float32) for s, v in old.items()},
                                  lr)
        outputs = [(w.numpy(), ref64, ref32)]
        outputs += [(tensors[s].numpy(), ref64_s[s], None) for s in kernel.tensor_states]
        for got, r64, r32 in outputs:
            with np.errstate(over="ignore"):
                conditioned = close(r64.astype(np.float32).astype(np.float64), r64, 1e-5)
            bad = conditioned & ~close(got, r64, 1e-9)
            assert not bad.any(), (f"{backend}: element {np.flatnonzero(bad)[0]}: got "
                                   f"{got[bad][0]!r}, float64 reference {r64[bad][0]!r}, "
                                   f"program:\n{canonical}")
            checked += int(conditioned.sum())
    assert checked > N * OPTION_PROGRAMS // 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("backend", HALF)
def test_half_parameters_compute_in_float32_and_round_once(backend, dtype):
    """A float16/bfloat16 weight and gradient are widened, the float32 reference step runs,
    and the weight is rounded back once (torch's rounding); float32 states. Triton's interpreter
    truncates to bfloat16 where a GPU rounds to nearest: one unit in the last place there."""
    ulp = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[dtype]
    for i, program in enumerate(option_programs()[:12]):
        canonical = program.canonical()
        kernel = kernels.compile(canonical, backend, dtype=dtype)
        rng = np.random.default_rng(9000 + i)
        w16 = torch.from_numpy(random_inputs(rng, N)).to(dtype)
        g16 = torch.from_numpy(random_inputs(rng, N)).to(dtype)
        state = {s: random_inputs(rng, N) for s in STATES}
        tensors = {s: torch.from_numpy(state[s].copy()) for s in kernel.tensor_states}
        for s in kernel.scalar_states:
            state[s] = np.float32(0.0)
        w = w16.clone()
        kernel(w, g16, tensors, 0.5, kernel.advance_scalars({}, 0.5))
        assert w.dtype == dtype and all(t.dtype == torch.float32 for t in tensors.values())
        ref32, ref_s = reference_step(canonical, w16.float().numpy(), g16.float().numpy(), state,
                                      0.5)
        ref64, _ = reference_step(canonical, w16.float().numpy(), g16.float().numpy(), state, 0.5,
                                  dtype=np.float64)
        want = torch.from_numpy(ref32).to(dtype).float().numpy()
        with np.errstate(over="ignore"):
            conditioned = close(ref32, ref64.astype(np.float32), 1e-5)
        bad = conditioned & ~close(w.float().numpy(), want, ulp * 1.01)
        assert not bad.any(), f"{backend} {dtype}: element {np.flatnonzero(bad)[0]}\n{canonical}"
        for s in kernel.tensor_states:
            bad = conditioned & ~close(tensors[s].numpy(), ref_s[s], RTOL[backend])
            assert not bad.any(), f"{backend} {dtype}: state {s}\n{canonical}"


def test_numba_refuses_half_parameters_and_names_the_backends_that_take_them():
    with pytest.raises(TypeError, match=r"numba backend updates float32, float64 parameters.*"
                                        r"torch.float16.*backend='torch' \(or 'triton' on CUDA\)"):
        kernels.compile("weight: grad", "numba", dtype=torch.float16)


# ---- the registry -------------------------------------------------------------------------------

def test_a_backend_added_to_the_registry_goes_through_the_shared_differential_tests(tmp_path):
    """A new backend is one record in codegen.backends: registered (here, a copy of the torch
    backend under another name, by a pytest plugin so that it exists before collection), it is
    compiled, launched and held to the reference by every backend-parametrized test above,
    with no test edited."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "extra_backend.py").write_text(
        "import dataclasses\n"
        "from codegen import backends\n"
        "backends.BACKENDS['torchcopy'] = dataclasses.replace(backends.get('torch'), "
        "name='torchcopy', rank=99)\n")
    root = Path(__file__).parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(root)]))
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "extra_backend", "-k", "torchcopy",
         "-p", "no:cacheprovider", str(Path(__file__))],
        capture_output=True, text=True, cwd=root, env=env, timeout=600)
    want = CHUNKS + len(UNARY + BINARY) + 1 + 1 + 1 + 2  # random, edge ops, sign, options, halves
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    assert f"{want} passed" in child.stdout, child.stdout[-3000:]


def test_the_registry_names_the_choices_and_auto_chooses_as_before():
    assert tuple(backends.BACKENDS) == ("numba", "triton", "torch")
    with pytest.raises(ValueError, match="unknown backend 'cuda': choose one of numba, triton, "
                                         "torch"):
        backends.get("cuda")
    assert backends.auto("cuda", "float32") == "triton"
    assert backends.auto("cpu", "float64") == "numba"
    assert backends.auto("cpu", "bfloat16") == "torch"


def test_triton_modules_hold_no_nan_valued_global():
    """Triton re-checks the globals a jit function reads each time it compiles a new
    specialisation (another size, another alignment) and refuses one whose value "changed":
    a NaN global never equals itself, so on a GPU the second compile of every kernel that used
    pow or a NaN constant failed. The interpreter never compiles, so the check is on the
    generated modules: no global may be NaN."""
    import math

    program = Program.parse("alpha: pow(grad, nan)\nweight: mul(lr, add(alpha, pow(grad, 0.5)))")
    module = kernels.compile(program, "triton").module
    for name, value in vars(module).items():
        value = getattr(value, "value", value)  # a tl.constexpr holds its value
        assert not (isinstance(value, float) and math.isnan(value)), name
