"""The IR interpreter: any batch of programs, one call, no per-program compile.

A generated Numba kernel costs ~0.1 s to compile, which at the micro tier (most candidates seen
once, trained for well under a second) would dominate. This module's loop is compiled once (and
kept by Numba's cache) and runs each program from its bytecode (codegen.bytecode):

* A *batch* is K segments of one flat float32 arena (weight, grad, and one buffer per state,
  all of the same layout). Each segment has its own instruction list, its own `lr` and its own
  uniform states. The same program at several lr scales is several segments that share one
  instruction list.
* Per segment, the prologue (steps that read only constants, `lr` and uniform states) runs once
  on one element, then the body runs over the segment in chunks of CHUNK elements: the chunk's
  inputs are copied into registers (rows of a small scratch array that stays in the L1/L2
  cache), every instruction is a loop over the chunk, the new states are copied back and the
  weight's delta is subtracted from the arena in place.
* The lr rule (codegen.bytecode.with_lr_rule): a program that never reads `lr` has its weight
  update scaled by its segment's `lr`.

Semantics are the IR's float32 reference (codegen.ir.REFERENCE_IMPL), tested against
codegen.ir.reference_step and the generated kernels in tests/test_interp.py.
"""

from __future__ import annotations

from typing import Sequence

import numba
import numpy as np
import torch

from codegen import bytecode
from codegen.bytecode import Bytecode, assemble
from codegen.ir import STATES, Program, UniformStepper

__all__ = ["CHUNK", "Batch"]

# Elements per pass of the body. Measured (bench/bench_interp.py, one thread, busy 2-core CPU):
# 256-4096 within ~5% of each other, 512 the best or tied on both rows; registers as long as
# the segment (no chunks) ~1.1x slower on 32 MLP-sized segments and 2-3x slower on a 1.2M one,
# whose registers (35 rows for Adam) no longer fit in any cache.
CHUNK = 512

# Uniform-state steps worked out at a time (see Batch.advance).
CHAIN = 64

# Columns of the per-segment table `meta` (int64, one row per segment).
(OFFSET, LENGTH, PC_START, PC_BODY, PC_END, CONST_START, N_CONST, READS_GRAD,
 KIND_ALPHA, WEIGHT_DELTA, STORE_ALPHA, N_META) = (0, 1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 15)
# KIND_ALPHA..+2 and STORE_ALPHA..+2: alpha, beta, sigma.

# The bytecode's numbering, spelled out here: Numba's cache (cache=True) is keyed on this file
# alone and freezes these values into the machine code it keeps, so a change in
# codegen/bytecode.py must not be able to run a stale interpreter. Checked at import.
OPS = ("neg", "square", "sqrt", "abs", "sign", "exp", "log", "add", "sub", "mul", "div", "pow",
       "min", "max")
(NEG, SQUARE, SQRT, ABS, SIGN, EXP, LOG, ADD, SUB, MUL, DIV, POW, MIN, MAX) = range(len(OPS))
GRAD, ALPHA, LR, FIXED = 1, 2, 5, 6
TENSOR, SCALAR = 1, 2
if (bytecode.OPCODES != {op: i for i, op in enumerate(OPS)}
        or (bytecode.GRAD, bytecode.ALPHA, bytecode.LR, bytecode.FIXED, bytecode.TENSOR,
            bytecode.SCALAR) != (GRAD, ALPHA, LR, FIXED, TENSOR, SCALAR)):
    raise ImportError("kernels/interp.py and codegen/bytecode.py number the bytecode differently: "
                      "update the copy in kernels/interp.py")

ZERO = np.float32(0.0)
ONE = np.float32(1.0)
INF = np.float32(np.inf)


# Inlined into `_run` (at Numba's IR level): as a call, each instruction paid for passing three
# array views (reference counts included), ~3x the time of an add over 512 elements.
@numba.njit(error_model="numpy", inline="always")
def _execute(op, o, x, y, m):
    """o[:m] = op(x, y)[:m] by the reference semantics; o is never x or y. Every loop body is
    branch-free (selects, `|` rather than `or`), so that LLVM vectorises it."""
    if op == ADD:
        for i in range(m):
            o[i] = x[i] + y[i]
    elif op == SUB:
        for i in range(m):
            o[i] = x[i] - y[i]
    elif op == MUL:
        for i in range(m):
            o[i] = x[i] * y[i]
    elif op == DIV:  # divide-no-NaN: 0 wherever the divisor is 0
        for i in range(m):
            b = y[i]
            q = x[i] / (b if b != ZERO else ONE)
            o[i] = q if b != ZERO else ZERO
    elif op == NEG:
        for i in range(m):
            o[i] = -x[i]
    elif op == SQUARE:
        for i in range(m):
            o[i] = x[i] * x[i]
    elif op == SQRT:
        for i in range(m):
            o[i] = np.sqrt(x[i])
    elif op == ABS:
        for i in range(m):
            o[i] = abs(x[i])
    elif op == SIGN:  # numpy's: sign(+-0) = +0, sign(NaN) = NaN
        for i in range(m):
            a = x[i]
            o[i] = ONE if a > ZERO else (-ONE if a < ZERO else (ZERO if a == ZERO else a))
    elif op == EXP:
        for i in range(m):
            o[i] = np.exp(x[i])
    elif op == LOG:
        for i in range(m):
            o[i] = np.log(x[i])
    elif op == POW:
        for i in range(m):
            a, b = x[i], y[i]
            # C's pow; Numba's ** says -inf for (-inf) ** y, y finite and not an integer.
            if a == -INF and b != np.floor(b) and b - b == ZERO:
                o[i] = INF if b > ZERO else ZERO
            else:
                o[i] = a ** b
    elif op == MIN:  # NaN-propagating, numpy's minimum (ties: the second operand)
        for i in range(m):
            a = x[i]
            o[i] = a if ((a < y[i]) | (a != a)) else y[i]
    elif op == MAX:
        for i in range(m):
            a = x[i]
            o[i] = a if ((a > y[i]) | (a != a)) else y[i]


@numba.njit(error_model="numpy", cache=True)
def _run(weight, grad, alpha, beta, sigma, meta, code, constants, lr, scalars, active, regs):
    chunk = regs.shape[1]
    states = (alpha, beta, sigma)
    for k in range(meta.shape[0]):
        n = meta[k, LENGTH]
        if not active[k] or n == 0:
            continue
        offset = meta[k, OFFSET]
        width = min(chunk, n)
        # Uniform rows: lr, uniform states, constants, then the prologue on element 0; each is
        # broadcast over the chunk once per segment.
        regs[LR, 0] = lr[k]
        for j in range(3):
            if meta[k, KIND_ALPHA + j] == SCALAR:
                regs[ALPHA + j, 0] = scalars[k, j]
        c0 = meta[k, CONST_START]
        n_const = meta[k, N_CONST]
        for c in range(n_const):
            regs[FIXED + c, 0] = constants[c0 + c]
        for pc in range(meta[k, PC_START], meta[k, PC_BODY]):
            _execute(code[pc, 0], regs[code[pc, 1]], regs[code[pc, 2]], regs[code[pc, 3]], 1)
        last_uniform = FIXED + n_const + meta[k, PC_BODY] - meta[k, PC_START]
        for r in range(ALPHA, last_uniform):
            if (r < LR and meta[k, KIND_ALPHA + r - ALPHA] != SCALAR):
                continue
            regs[r, 1:width] = regs[r, 0]
        reads_grad = meta[k, READS_GRAD]
        for start in range(offset, offset + n, chunk):
            m = min(chunk, offset + n - start)
            if reads_grad:
                regs[GRAD, :m] = grad[start:start + m]
            for j in range(3):
                if meta[k, KIND_ALPHA + j] == TENSOR:
                    regs[ALPHA + j, :m] = states[j][start:start + m]
            for pc in range(meta[k, PC_BODY], meta[k, PC_END]):
                _execute(code[pc, 0], regs[code[pc, 1]], regs[code[pc, 2]], regs[code[pc, 3]], m)
            delta = regs[meta[k, WEIGHT_DELTA]]
            for i in range(m):  # weight <- weight - delta, in place: one pass, no copies
                weight[start + i] = weight[start + i] - delta[i]
            for j in range(3):
                if meta[k, KIND_ALPHA + j] == TENSOR:
                    states[j][start:start + m] = regs[meta[k, STORE_ALPHA + j], :m]


_EMPTY = np.zeros(0, np.float32)
Buffer = np.ndarray | torch.Tensor


def _flat(buffer: Buffer | None, name: str) -> np.ndarray:
    if buffer is None:
        return _EMPTY
    if isinstance(buffer, torch.Tensor):
        if buffer.device.type != "cpu" or buffer.dtype != torch.float32 or \
                not buffer.is_contiguous():
            raise TypeError(f"the interpreter needs contiguous float32 CPU buffers; {name} is "
                            f"{buffer.dtype} on {buffer.device} "
                            f"(contiguous={buffer.is_contiguous()})")
        buffer = buffer.detach().numpy()
    if not isinstance(buffer, np.ndarray) or buffer.dtype != np.float32 or buffer.ndim != 1 \
            or not buffer.flags.c_contiguous or not buffer.flags.writeable:
        raise TypeError(f"{name} must be a flat, contiguous, writeable float32 array (numpy or a "
                        f"CPU tensor), got {getattr(buffer, 'dtype', type(buffer).__name__)} of "
                        f"shape {getattr(buffer, 'shape', '?')}")
    return buffer.reshape(-1)


class Batch:
    """K segments of one arena, each with its program, lr and uniform states; `step` advances
    them all by one optimizer step in one interpreter call.

    `lr` (float32, one per segment) may be changed between steps (a schedule); `scalars`
    (float32, K x 3: alpha, beta, sigma) holds each segment's uniform states, advanced by `step`
    as the reference semantics say (the program's UniformStepper), and may be set to resume.
    """

    def __init__(self, programs: Sequence[Program], offsets: Sequence[int],
                 lengths: Sequence[int], lr: Sequence[float] | float = 1.0,
                 chunk: int = CHUNK) -> None:
        k = len(programs)
        if not (len(offsets) == len(lengths) == k):
            raise ValueError(f"a batch needs one offset and one length per program: got {k} "
                             f"programs, {len(offsets)} offsets, {len(lengths)} lengths")
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1 element, got {chunk}")
        self.offsets = np.asarray(offsets, np.int64).reshape(k)
        self.lengths = np.asarray(lengths, np.int64).reshape(k)
        if (self.offsets < 0).any() or (self.lengths < 0).any():
            raise ValueError("segment offsets and lengths must be >= 0")
        order = np.argsort(self.offsets, kind="stable")
        ends = self.offsets[order] + self.lengths[order]
        if (self.offsets[order][1:] < ends[:-1]).any():
            raise ValueError("segments overlap: each element of the arena belongs to at most one "
                             "segment (give each program, and each lr scale, its own slice)")
        self.end = int(ends.max()) if k else 0
        self.chunk = int(chunk)
        self.codes: list[Bytecode] = [assemble(p) for p in programs]
        self.programs = [c.program for c in self.codes]  # canonical
        lrs = np.asarray(lr, np.float32)
        if lrs.ndim and lrs.shape != (k,):
            raise ValueError(f"lr must be one number or one per segment ({k}), got {lrs.shape[0]}")
        self.lr = np.empty(k, np.float32)
        self.lr[:] = lrs
        self.scalars = np.zeros((k, 3), np.float32)
        self.meta, self.code, self.constants = _tables(self.codes, self.offsets, self.lengths)
        # The registers: rows of one scratch array, kept between steps.
        n_registers = max([FIXED] + [c.n_registers for c in self.codes])
        self.registers = np.zeros((n_registers, min(self.chunk, max(1, int(self.lengths.max(
            initial=1))))), np.float32)
        self.needs = {s: any(c.kinds[j] == TENSOR for c in self.codes)
                      for j, s in enumerate(STATES)}
        self.needs_grad = any(c.reads_grad for c in self.codes)
        # Uniform states: each segment's next CHAIN values, where it is in them, and what
        # they were computed from (see advance).
        self._uniform = np.array([bool(c.scalar_states) for c in self.codes], np.bool_)
        self._steppers = [p.stepper() for p in self.programs]
        self._keys = [_uniform_key(stepper) for stepper in self._steppers]
        self._chains = np.zeros((k, CHAIN, 3), np.float32)
        self._pos = np.full(k, CHAIN, np.int64)
        self._chain_lr = self.lr.copy()
        self._written = self.scalars.copy()

    def __len__(self) -> int:
        return len(self.codes)

    def advance(self, active: np.ndarray) -> None:
        """Each active segment's uniform states one step on (the values its step will read).

        The values come from each program's UniformStepper, CHAIN steps at a time: per step this is a
        few numpy operations for the whole batch, not a float32 tree walk per segment (~10 us
        each). A chain is recomputed when used up, when a segment's lr changed, or when someone
        wrote `scalars` (a resume): each segment's values are always those the reference
        semantics give from its current values and lr."""
        moving = active & self._uniform
        stale = moving & ((self._pos >= CHAIN)
                          | (self.lr.view(np.uint32) != self._chain_lr.view(np.uint32))
                          | (self.scalars.view(np.uint32) != self._written.view(np.uint32)
                             ).any(axis=1))
        for k in np.flatnonzero(stale):
            self._chains[k] = _chain(self._steppers[k], self._keys[k], self.scalars[k],
                                     self.lr[k])
            self._pos[k] = 0
            self._chain_lr[k] = self.lr[k]
        index = np.flatnonzero(moving)
        self.scalars[index] = self._chains[index, self._pos[index]]
        self._pos[index] += 1
        self._written[:] = self.scalars

    def step(self, weight: Buffer, grad: Buffer, alpha: Buffer | None = None,
             beta: Buffer | None = None, sigma: Buffer | None = None,
             active: Sequence[bool] | np.ndarray | None = None) -> None:
        """One step of every active segment, in place. Buffers are flat float32 (numpy or CPU
        tensors) covering every segment; a state buffer may be None when no program keeps that
        state as a tensor. An inactive segment (a diverged candidate) is left as it is."""
        buffers = {"weight": _flat(weight, "weight"), "grad": _flat(grad, "grad"),
                   "alpha": _flat(alpha, "alpha"), "beta": _flat(beta, "beta"),
                   "sigma": _flat(sigma, "sigma")}
        needed = {"weight": True, "grad": self.needs_grad, **self.needs}
        for name, buffer in buffers.items():
            if needed[name] and buffer.shape[0] < self.end:
                have = "none" if buffer is _EMPTY else f"{buffer.shape[0]} elements"
                raise ValueError(f"{name} must cover the batch's {self.end} elements, got "
                                 f"{have}")
        mask = np.ones(len(self), np.bool_) if active is None else \
            np.asarray(active, np.bool_).reshape(len(self))
        self.advance(mask)
        _run(buffers["weight"], buffers["grad"], buffers["alpha"], buffers["beta"],
             buffers["sigma"], self.meta, self.code, self.constants, self.lr, self.scalars,
             mask, self.registers)


def _uniform_key(stepper: UniformStepper) -> tuple:
    """What a segment's uniform states depend on besides their values: their deltas, and
    whether those read lr (segments that share a step counter share its chains)."""
    return tuple((s, str(delta)) for s, delta in stepper.deltas), stepper.reads_lr


# Chains of uniform-state values, shared by every batch in this process: a step counter's
# values from 0 at one lr are worked out once, whichever candidates count with it.
_CHAINS: dict[tuple, np.ndarray] = {}


def _chain(stepper: UniformStepper, key: tuple, old: np.ndarray, lr: np.float32
           ) -> np.ndarray:
    """The uniform states' next CHAIN values (rows: after 1, 2, ... steps), by the program's
    UniformStepper, from `old` (float32 alpha, beta, sigma) at `lr`."""
    deltas, reads_lr = key
    memo = (deltas, old.tobytes(), lr.tobytes() if reads_lr else None)
    chain = _CHAINS.get(memo)
    if chain is None:
        if len(_CHAINS) >= 4096:
            _CHAINS.clear()
        values = dict(zip(STATES, map(float, old)))
        chain = np.empty((CHAIN, 3), np.float32)
        for i, new in enumerate(stepper.chain(values, float(lr), CHAIN)):
            values.update(new)
            chain[i] = [values[s] for s in STATES]
        _CHAINS[memo] = chain
    return chain


def _tables(codes: list[Bytecode], offsets: np.ndarray, lengths: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The per-segment table and the concatenated code and constants; segments running one
    program (its lr scales) share one copy of its instructions."""
    meta = np.zeros((len(codes), N_META), np.int64)
    pieces, consts, placed = [], [], {}
    pc = n_const = 0
    for k, code in enumerate(codes):
        where = placed.get(id(code))
        if where is None:
            where = placed[id(code)] = (pc, n_const)
            pieces.append(code.code)
            consts.append(code.constants)
            pc += code.code.shape[0]
            n_const += code.constants.shape[0]
        start, c0 = where
        meta[k, :N_META] = (offsets[k], lengths[k], start, start + code.n_prologue,
                            start + code.code.shape[0], c0, code.constants.shape[0],
                            code.reads_grad, *code.kinds, code.weight_delta, *code.stores)
    code = np.concatenate(pieces) if pieces else np.zeros((0, 4), np.int32)
    constants = np.concatenate(consts) if consts else np.zeros(0, np.float32)
    return meta, np.ascontiguousarray(code, np.int32), constants.astype(np.float32)
