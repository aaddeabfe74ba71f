"""Cheap verdicts before training: screening and behavioural fingerprints.

Both run the program in numpy (no compile) on fixed probe inputs, so a broken candidate costs
milliseconds instead of a training run, and two candidates that behave identically on the probes
are trained once (AutoML-Zero's functional-equivalence cache). Screening uses the reference
(float32) semantics; the fingerprint also runs the program in float64, so that float32 rounding
noise does not tell equivalent programs apart (see `fingerprint` for what it promises).
"""

from __future__ import annotations

import hashlib

import numpy as np

from codegen.ir import STATES, TARGETS, Call, Const, Node, Program, Var, evaluate, \
    reference_step

PROBE_SIZE = 256
PROBE_STEPS = 5
FINGERPRINT_DIGITS = 6  # significant digits of the float64 deltas kept (see `fingerprint`)
FLOAT32_DRIFT = 1e-3  # float32 results further than this (relative) from float64 are marked
FINGERPRINT_VERSION = 2  # bump when what a fingerprint means changes: stores keep them


def _probe_inputs() -> tuple[np.ndarray, list[np.ndarray]]:
    """Fixed weights and per-step gradients spanning the magnitudes real gradients have."""
    rng = np.random.default_rng(20200708)  # fixed forever: fingerprints are stored across runs
    scales = np.logspace(-6, 0, PROBE_SIZE).astype(np.float32)
    weight = (rng.standard_normal(PROBE_SIZE) * 0.05).astype(np.float32)
    grads = [(rng.standard_normal(PROBE_SIZE) * scales).astype(np.float32) for _ in range(PROBE_STEPS)]
    return weight, grads


def probe_updates(program: Program, lr: float = 1.0) -> list[np.ndarray]:
    """The weight change of each of PROBE_STEPS steps on the probe inputs, from zero state."""
    weight, grads = _probe_inputs()
    state: dict = {}
    updates = []
    for grad in grads:
        new_weight, state = reference_step(program, weight, grad, state, lr)
        with np.errstate(all="ignore"):
            updates.append(new_weight - weight)
        weight = new_weight
    return updates


def screen(program: Program, updates: list[np.ndarray] | None = None) -> str | None:
    """Why `program` cannot be a useful optimizer without training it, or None if it might be."""
    if not program.reads_grad_in_weight():
        return "screened: the weight update does not depend on grad"
    updates = probe_updates(program) if updates is None else updates
    for step, update in enumerate(updates, start=1):
        if not np.isfinite(update).all():
            return f"screened: NaN or inf weight update on probe inputs at step {step}"
    if all(not update.any() for update in updates):
        return "screened: the weight never changes on probe inputs"
    return None


def fingerprint(program: Program) -> str:
    """A behavioural key: equal for programs that compute the same weight updates on the probes.

    Hashed: every probe step's weight delta (the weight line's value) computed in float64 with
    each constant read as the decimal the program prints for it (the shortest that reads back as
    its float32), quantised to FINGERPRINT_DIGITS significant digits, plus where float32
    arithmetic departs from that by more than FLOAT32_DRIFT of the value (cancellation,
    underflow: the kernels run in float32).

    What is guaranteed:
    - programs whose deltas differ by more than one part in 10**(FINGERPRINT_DIGITS - 1) at
      some probe input get different fingerprints (`mul(0.0101, grad)` against `mul(0.01,
      grad)`), as do programs that agree in float64 but of which only one loses more than
      FLOAT32_DRIFT to float32 rounding somewhere (`sub(add(grad, 1.0), 1.0)` against `grad`);
    - programs that are the same formula of the same written constants up to reordering or
      re-association (`mul(0.1, mul(0.1, grad))` and `mul(0.01, grad)`, 3.7e-9 apart in
      float32) differ by ~1e-16 relative in float64, so they collide unless one of the 1,280
      deltas lies within that distance of a rounding boundary (odds ~1e-7 per pair), or
      float32 loses close to FLOAT32_DRIFT of some delta in one of them (ill-conditioned
      formulas only: a well-conditioned one loses ~1e-7).
    What is not: a float32 noise floor in the constants themselves. `mul(0.1, 0.1)` folded by
    hand into `0.010000001` is another decimal and gets its own fingerprint; the cost of such a
    miss is one more training, never a wrong fitness.

    The string names its version, so a store holding fingerprints of an earlier scheme is never
    matched against this one (those rows still answer by program hash).
    """
    exact = np.stack(_deltas(program, np.float64))
    single = np.stack(_deltas(program, np.float32)).astype(np.float64)
    with np.errstate(all="ignore"):
        # NaN compares false: a non-finite delta counts as drifted, the same way for every program.
        drifted = ~(np.abs(single - exact) <= FLOAT32_DRIFT * np.abs(exact))
    digest = hashlib.sha256()
    for part in (*_significant(exact, FINGERPRINT_DIGITS), np.packbits(drifted)):
        digest.update(part.tobytes())
    return f"v{FINGERPRINT_VERSION}-{digest.hexdigest()[:20]}"


def _deltas(program: Program, dtype: type[np.floating]) -> list[np.ndarray]:
    """The weight line's value at each probe step (lr 1), in `dtype` arithmetic, every constant
    read from its decimal text. In float32 that is the reference semantics (the text reads back
    as the same float32); in float64 it is the formula as written, without float32 rounding.
    Deltas, not weight differences: the weight is no input of any line, and a difference of two
    weights would quantise small updates to the weight's ulp."""
    env: dict[str, object] = {"lr": dtype(1.0), **{s: dtype(0.0) for s in STATES}}
    lines = {target: None if getattr(program, target) is None
             else _constants_as_inputs(getattr(program, target), env, dtype)
             for target in TARGETS}
    deltas = []
    for grad in _probe_inputs()[1]:
        env["grad"] = grad.astype(dtype)
        with np.errstate(all="ignore"):
            for s in STATES:
                if lines[s] is not None:
                    env[s] = np.asarray(env[s] - evaluate(lines[s], env, dtype), dtype)
        delta = dtype(0.0) if lines["weight"] is None else evaluate(lines["weight"], env, dtype)
        deltas.append(np.broadcast_to(np.asarray(delta, dtype), grad.shape))
    return deltas


def _constants_as_inputs(node: Node, env: dict[str, object], dtype: type[np.floating]) -> Node:
    """`node` with every constant replaced by an input holding its decimal text's `dtype` value."""
    if isinstance(node, Const):
        name = f"#{len(env)}"  # no program variable starts with '#'
        env[name] = dtype(float(str(node)))
        return Var(name)
    if isinstance(node, Call):
        return Call(node.op, tuple(_constants_as_inputs(a, env, dtype) for a in node.args))
    return node


def _significant(values: np.ndarray, digits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kind, mantissa, exponent) of each value rounded to `digits` significant digits: exact
    integers, so one rounded value has one representation (a float division would not promise
    that). kind: 0 zero, 1 finite, 2 +inf, 3 -inf, 4 NaN."""
    finite = np.isfinite(values) & (values != 0)
    kind = np.select([values == 0, finite, values == np.inf, values == -np.inf], [0, 1, 2, 3], 4)
    safe = np.where(finite, values, 1.0)
    exponent = np.floor(np.log10(np.abs(safe)))
    # The scale in two factors: 10**330 for a subnormal (or 10**-300 for 1e300) is out of range.
    shift = digits - 1 - exponent
    mantissa = np.round(safe * 10.0 ** np.floor(shift / 2) * 10.0 ** np.ceil(shift / 2))
    # 9.9999996 rounds to 10.00000: write it as 10.0000 is written, one digit up.
    carry = np.abs(mantissa) >= 10.0**digits
    mantissa, exponent = np.where(carry, np.round(mantissa / 10), mantissa), exponent + carry
    mantissa, exponent = np.where(finite, mantissa, 0), np.where(finite, exponent, 0)
    return kind.astype(np.int8), mantissa.astype(np.int64), exponent.astype(np.int64)
