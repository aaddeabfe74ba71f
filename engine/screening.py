"""Cheap verdicts before training: screening and behavioural fingerprints.

Both run the program by the reference semantics (numpy, no compile) on fixed probe inputs, so a
broken candidate costs milliseconds instead of a training run, and two candidates that behave
identically on the probes are trained once (AutoML-Zero's functional-equivalence cache).
"""

from __future__ import annotations

import hashlib

import numpy as np

from codegen.ir import Program, reference_step

PROBE_SIZE = 256
PROBE_STEPS = 5
FINGERPRINT_DIGITS = 6  # significant digits kept: float32 noise below, behaviour above


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


def fingerprint(updates: list[np.ndarray]) -> str:
    """Hash of the probe updates rounded to FINGERPRINT_DIGITS significant digits."""
    stacked = np.stack(updates).astype(np.float64)
    with np.errstate(all="ignore"):
        exponent = np.floor(np.log10(np.abs(stacked), where=stacked != 0, out=np.zeros_like(stacked)))
        scale = 10.0 ** (FINGERPRINT_DIGITS - 1 - exponent)
        rounded = np.where(np.isfinite(stacked), np.round(stacked * scale) / scale, stacked)
    return hashlib.sha256(rounded.tobytes()).hexdigest()[:20]
