"""The IR interpreter (kernels.interp) against the float32 reference and the generated kernels.

A batch holds several programs, each on its own segment of one arena with its own lr, over
edge-heavy inputs and several steps. Each segment must give what its program alone gives by
codegen.ir.reference_step (with the lr rule applied: codegen.bytecode.with_lr_rule):

* bit for bit (a NaN's sign bit aside) for programs without exp, log or pow: every other op is
  exactly rounded IEEE arithmetic, the same in numpy and in the interpreter;
* for exp, log and pow, numpy's float32 implementations and the C library's differ in the last
  bits (numpy's SIMD exp(1) is one ulp from the correctly rounded e), so there the elements are
  judged as tests/test_backends.py judges every backend: same class and close where the float32
  reference agrees with float64.

Against the generated Numba kernel, which calls the same C library, the interpreter must agree
bit for bit on every program (NaN sign aside).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import kernels
from codegen.bytecode import assemble, reads_lr, with_lr_rule
from codegen.ir import STATES, Call, Program, reference_step, walk
from kernels.interp import CHUNK, Batch
from numerics import close
from randprog import EDGE_VALUES, random_inputs, random_program

TRANSCENDENTAL = {"exp", "log", "pow"}
LRS = (1.0, 0.01, 0.5, 3.0, 0.0, -0.5)
# Segment lengths: empty, one element, a chunk's edges, several chunks with a remainder.
LENGTHS = (0, 1, 7, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5, 96)


def ops(program: Program) -> set[str]:
    return {n.op for e in program.canonical().deltas().values() if e is not None
            for n in walk(e) if isinstance(n, Call)}


def same_bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise: the same float32 bits, or both NaN (x86 makes NaNs of either sign)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return (a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))


def assert_matches(name: str, got, ref32, ref64, exact: bool, context: str) -> None:
    got, ref32 = np.atleast_1d(got), np.atleast_1d(ref32)
    if exact:
        bad = ~same_bits(got, ref32)
    else:
        with np.errstate(over="ignore"):
            conditioned = close(ref32, np.atleast_1d(ref64).astype(np.float32), 1e-5)
        bad = conditioned & ~close(got, ref32, 1e-4)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        pytest.fail(f"{name} differs at element {i}: got {got[i]!r}, reference {ref32[i]!r} "
                    f"({'bit for bit' if exact else 'close'}); {context}")


def arena(rng: np.random.Generator, total: int) -> dict[str, np.ndarray]:
    return {name: random_inputs(rng, total) for name in ("weight", "grad", *STATES)}


def layout(lengths) -> list[int]:
    # Gaps between segments hold values no segment owns: the interpreter must leave them alone.
    offsets, at = [], 3
    for n in lengths:
        offsets.append(at)
        at += n + 5
    return offsets


def check_batch(programs: list[Program], lrs: list[float], lengths: list[int], seed: int,
                steps: int = 3, chunk: int = CHUNK) -> None:
    """`steps` steps of one batch, each segment held to its program's reference step from the
    same inputs (the buffers restart from the reference each step, so that a last-bit difference
    in exp cannot snowball; the uniform states are the batch's own throughout)."""
    rng = np.random.default_rng(seed)
    offsets = layout(lengths)
    total = offsets[-1] + lengths[-1] + 4
    buffers = arena(rng, total)
    batch = Batch(programs, offsets, lengths, lrs, chunk=chunk)
    outside = np.ones(total, bool)
    for o, n in zip(offsets, lengths):
        outside[o:o + n] = False
    for step in range(steps):
        buffers["grad"] = random_inputs(rng, total)
        before = {k: v.copy() for k, v in buffers.items()}
        scalars = batch.scalars.copy()
        batch.step(buffers["weight"], buffers["grad"], *(buffers[s] for s in STATES))
        for k, (program, lr, o, n) in enumerate(zip(programs, lrs, offsets, lengths)):
            ruled = with_lr_rule(program)
            code = assemble(program)
            exact = not ops(ruled) & TRANSCENDENTAL
            state = {s: before[s][o:o + n] for s in code.tensor_states}
            state.update({s: np.float32(scalars[k, j]) for j, s in enumerate(STATES)
                          if s in code.scalar_states})
            ref = reference_step(ruled, before["weight"][o:o + n], before["grad"][o:o + n],
                                 state, lr)
            ref64 = reference_step(ruled, before["weight"][o:o + n], before["grad"][o:o + n],
                                   state, lr, dtype=np.float64)
            context = f"segment {k} (lr {lr}, {n} elements), step {step}, program:\n{program}"
            assert_matches("weight", buffers["weight"][o:o + n], ref[0], ref64[0], exact, context)
            buffers["weight"][o:o + n] = ref[0]
            for j, s in enumerate(STATES):
                if s in code.tensor_states:
                    assert_matches(s, buffers[s][o:o + n], ref[1][s], ref64[1][s], exact, context)
                    buffers[s][o:o + n] = ref[1][s]
                elif s in code.scalar_states:  # advanced by the UniformStepper: exact
                    assert same_bits(batch.scalars[k, j], ref[1][s]).all(), context
                else:  # a state the program does not keep is never written
                    assert same_bits(buffers[s][o:o + n], before[s][o:o + n]).all(), context
        for name in ("weight", *STATES):
            assert same_bits(buffers[name][outside], before[name][outside]).all(), \
                f"{name} changed outside every segment"


def random_batch(rng: random.Random, k: int) -> tuple[list[Program], list[float], list[int]]:
    """k segments: random programs, one of them at two lr scales (sharing its instructions)."""
    programs = [random_program(rng, max_depth=6) for _ in range(k - 1)]
    programs.insert(rng.randrange(k), programs[0])
    lrs = [rng.choice(LRS) for _ in range(k)]
    lengths = [rng.choice(LENGTHS) for _ in range(k)]
    return programs, lrs, lengths


@pytest.mark.parametrize("chunk", range(12))
def test_random_batches_match_reference(chunk):
    rng = random.Random(5000 + chunk)
    for i in range(6):  # 6 batches of 6 segments: 30 programs per chunk, 360 in all
        programs, lrs, lengths = random_batch(rng, 6)
        check_batch(programs, lrs, lengths, seed=100 * chunk + i,
                    chunk=CHUNK if i % 2 else rng.choice((1, 3, 64)))


def test_random_batches_cover_exact_and_uniform_cases():
    """The random batches above reach what they must: exact and transcendental programs,
    programs with uniform states, programs that read lr and ones scaled by the rule."""
    kinds = {"exact": 0, "transcendental": 0, "uniform": 0, "scaled": 0, "reads lr": 0,
             "prologue": 0}
    for chunk in range(12):
        rng = random.Random(5000 + chunk)
        for _ in range(6):
            for program in random_batch(rng, 6)[0]:
                code = assemble(program)
                kinds["transcendental" if ops(with_lr_rule(program)) & TRANSCENDENTAL
                      else "exact"] += 1
                kinds["uniform"] += bool(code.scalar_states)
                kinds["scaled" if code.scaled_by_lr else "reads lr"] += 1
                kinds["prologue"] += code.n_prologue > 0
    assert min(kinds.values()) >= 20, kinds


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "rmsprop", "adam", "ades",
                                  "sign"])
def test_zoo_programs_match_reference(name):
    program = getattr(kernels.zoo, name)()
    check_batch([program, program, kernels.zoo.sgd()], [1e-3, 0.1, 0.01],
                [3 * CHUNK + 5, 100, 64], seed=7, steps=4)


UNARY = ("neg", "square", "sqrt", "abs", "sign", "exp", "log")
BINARY = ("add", "sub", "mul", "div", "pow", "min", "max")
ULPS = {"exp": 4, "log": 4, "pow": 64}  # as tests/test_backends.py allows every backend


@pytest.mark.parametrize("op", UNARY + BINARY)
def test_each_op_on_edge_inputs(op):
    """Every op on every pair of edge values, the second operand a tensor state (every pair at
    once) and lr (a uniform operand: the prologue's path), in both orders."""
    grad = np.repeat(EDGE_VALUES, len(EDGE_VALUES))
    other = np.tile(EDGE_VALUES, len(EDGE_VALUES))
    texts = [f"weight: {op}(grad)"] if op in UNARY else [
        f"weight: {op}(grad, alpha)", f"weight: {op}(alpha, grad)", f"weight: {op}(grad, lr)",
        f"weight: {op}(lr, lr)"]
    rtol = ULPS.get(op, 0) * 6e-8
    for text in texts:
        # alpha: a tensor state (its delta reads grad) that keeps its value: at lr 1 its delta
        # is 1 - pow(grad, 0) = 0 for every grad (C pow: x ** 0 = 1, NaN included).
        keep = "alpha: sub(1.0, pow(grad, sub(lr, lr)))\n"
        program = Program.parse((keep if "alpha" in text else "") + text)
        for lr in (EDGE_VALUES if "lr" in text else (1.0,)):
            ref, _ = reference_step(with_lr_rule(program), np.full_like(grad, -0.0), grad,
                                    {"alpha": other}, float(lr))
            for chunk in (CHUNK, 5):
                # -0 - x keeps the sign of a zero x: -0 - (+0) = -0, -0 - (-0) = +0.
                w, alpha = np.full_like(grad, -0.0), other.copy()
                Batch([program], [0], [len(grad)], float(lr), chunk=chunk).step(w, grad, alpha)
                ok = same_bits(w, ref) | (close(w, ref, rtol) if rtol else False)
                assert ok.all(), (f"{text} lr={lr!r} chunk {chunk}: grad {grad[~ok][:4]} "
                                  f"other {other[~ok][:4]} got {w[~ok][:4]} want {ref[~ok][:4]}")


def test_lr_rule():
    """A program that never reads lr is scaled by each segment's lr; one that reads lr is not
    scaled again. Both at three lrs in one call, sharing one copy of their instructions."""
    plain, reads = Program.parse("weight: sign(grad)"), Program.parse("weight: mul(lr, grad)")
    assert not reads_lr(plain) and reads_lr(reads)
    lrs = [1.0, 0.5, 0.25]
    n = 4
    grad = np.array([1.0, -2.0, 4.0, 0.5], np.float32)
    batch = Batch([plain] * 3 + [reads] * 3, [i * n for i in range(6)], [n] * 6, lrs + lrs)
    assert batch.code.shape[0] == assemble(plain).code.shape[0] + assemble(reads).code.shape[0]
    w = np.zeros(6 * n, np.float32)
    batch.step(w, np.tile(grad, 6))
    expect = [-lr * np.sign(grad) for lr in lrs] + [-lr * grad for lr in lrs]
    np.testing.assert_array_equal(w, np.concatenate(expect).astype(np.float32))


def test_inactive_segments_are_left_alone():
    """A diverged candidate is masked out: its slice and its uniform states stay as they were,
    and the others step exactly as without it."""
    adam = kernels.zoo.adam()
    rng = np.random.default_rng(3)
    buffers = arena(rng, 300)
    alone = {k: v.copy() for k, v in buffers.items()}
    masked = Batch([adam, adam], [0, 100], [100, 200], [1e-3, 1e-2])
    masked.step(*(buffers[k] for k in ("weight", "grad", *STATES)), active=[False, True])
    Batch([adam], [100], [200], 1e-2).step(*(alone[k] for k in ("weight", "grad", *STATES)))
    for name in ("weight", *STATES):
        assert same_bits(buffers[name][:100], alone[name][:100]).all()  # untouched
        assert same_bits(buffers[name][100:], alone[name][100:]).all()  # as if alone
    assert masked.scalars[0].tolist() == [0, 0, 0] and masked.scalars[1, 2] == 1


def test_matches_generated_numba_kernel_bit_for_bit():
    """Same inputs through the generated fused kernel (of the lr-ruled program) and through
    the interpreter: the same bits, exp, log, pow and sign included (both call the C library;
    both give numpy's sign(-0) = +0)."""
    rng = random.Random(77)
    nrng = np.random.default_rng(77)
    programs = [random_program(rng, max_depth=5) for _ in range(24)]
    n = 3 * CHUNK + 5
    for program in programs:
        kernel = kernels.compile(with_lr_rule(program), "numba")
        code = assemble(program)
        assert kernel.tensor_states == code.tensor_states
        buffers = arena(nrng, n)
        lr = float(nrng.choice([1.0, 0.01, 3.0]))
        ours = {k: v.copy() for k, v in buffers.items()}
        batch = Batch([program], [0], [n], lr)
        for _ in range(2):
            scalars = kernel.advance_scalars(dict(zip(STATES, map(float, batch.scalars[0]))), lr)
            kernel(torch.from_numpy(buffers["weight"]), torch.from_numpy(buffers["grad"]),
                   {s: torch.from_numpy(buffers[s]) for s in kernel.tensor_states}, lr, scalars)
            batch.step(*(ours[k] for k in ("weight", "grad", *STATES)))
        for name in ("weight", *kernel.tensor_states):
            bad = ~same_bits(ours[name], buffers[name])
            assert not bad.any(), (f"{name} differs from the generated kernel at "
                                   f"{np.flatnonzero(bad)[:4]}: {ours[name][bad][:4]} vs "
                                   f"{buffers[name][bad][:4]}\n{program}")


def test_torch_buffers_and_bad_inputs():
    program = kernels.zoo.adam()
    w, g = torch.zeros(10), torch.ones(10)
    a, b = torch.zeros(10), torch.zeros(10)
    Batch([program], [0], [10], 0.1).step(w, g, a, b)
    assert (w != 0).all()
    with pytest.raises(ValueError, match="overlap"):
        Batch([program, program], [0, 5], [10, 10])
    with pytest.raises(ValueError, match="lr must be one number or one per segment"):
        Batch([program, program], [0, 10], [10, 10], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="one offset and one length"):
        Batch([program], [0, 5], [10])
    with pytest.raises(ValueError, match="beta must cover the batch's 10 elements, got none"):
        Batch([program], [0], [10]).step(w, g, a)
    with pytest.raises(ValueError, match="weight must cover the batch's 20 elements"):
        Batch([program], [10], [10]).step(w, g, a, b)
    with pytest.raises(TypeError, match="float32"):
        Batch([program], [0], [10]).step(w.double(), g, a, b)
    with pytest.raises(TypeError, match="contiguous"):
        Batch([program], [0], [5]).step(w[::2], g, a, b)


def test_uniform_states_follow_the_reference_past_a_chain():
    """Uniform states are worked out CHAIN steps ahead: past the end of a chain, after an lr
    change, after `scalars` is written (a resume) and across masked steps, each segment's values
    stay those the UniformStepper gives step by step."""
    from kernels.interp import CHAIN

    programs = [Program.parse("alpha: -1.0\nbeta: sub(beta, mul(lr, alpha))\n"
                              "weight: mul(beta, grad)"), kernels.zoo.adam()]
    batch = Batch(programs * 2, [0, 4, 8, 12], [4] * 4, [0.5, 1e-3, 0.25, 1e-2])
    expect = [{} for _ in range(4)]
    w, g = np.zeros(16, np.float32), np.ones(16, np.float32)
    states = [np.zeros(16, np.float32) for _ in STATES]
    for step in range(2 * CHAIN + 10):
        if step == CHAIN // 2:
            batch.lr[0] = 0.125
        if step == CHAIN + 3:  # a resume: someone sets the states
            batch.scalars[2] = [5.0, -2.0, 0.0]
            expect[2] = {"alpha": 5.0, "beta": -2.0}
        active = np.array([True, True, step % 3 != 0, True])
        batch.step(w, g, *states, active=active)
        for k, program in enumerate(programs * 2):
            if active[k]:
                expect[k] = program.stepper().step(expect[k], float(batch.lr[k]))
            got = dict(zip(STATES, batch.scalars[k].tolist()))
            assert all(got[s] == v for s, v in expect[k].items()), (step, k, got, expect[k])


def test_interpreter_refuses_a_renumbered_bytecode(monkeypatch):
    """Numba's cache keeps the interpreter's machine code by kernels/interp.py's own stamp, with
    the opcode numbers frozen in: renumbering codegen/bytecode.py alone must fail loudly at
    import, never run cached code that reads max as min."""
    import importlib

    import codegen.bytecode
    import kernels.interp

    swapped = {**codegen.bytecode.OPCODES, "min": codegen.bytecode.OPCODES["max"],
               "max": codegen.bytecode.OPCODES["min"]}
    monkeypatch.setattr(codegen.bytecode, "OPCODES", swapped)
    with pytest.raises(ImportError, match="number the bytecode differently"):
        importlib.reload(kernels.interp)
    monkeypatch.undo()
    importlib.reload(kernels.interp)
