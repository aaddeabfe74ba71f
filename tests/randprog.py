"""Seeded random programs over every op, for the differential and property tests."""

from __future__ import annotations

import random

import numpy as np

from codegen.ir import ARITHMETIC_OPS, ARITY, STATES, VISIBLE, Call, Const, Program, Var

OPS = sorted(ARITHMETIC_OPS)
# Constants that exercise the edge cases: zero, integer exponents, negatives, tiny and huge.
CONSTANTS = (0.0, 1.0, -1.0, 2.0, 3.0, -2.0, 0.5, 0.9, 0.999, 1e-8, 1e8, -2.5, 0.1, 7.0)
# Input values the same: plus inf, -inf, nan and -0.
EDGE_VALUES = np.array([0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 3.0, -3.0, 0.5, -0.5, 1e30, -1e30,
                        1e-30, -1e-30, 1e-42, np.inf, -np.inf, np.nan], dtype=np.float32)


def random_expr(rng: random.Random, visible: list[str], depth: int) -> object:
    if depth <= 1 or rng.random() < 0.2:
        if rng.random() < 0.35:
            value = rng.choice(CONSTANTS) if rng.random() < 0.7 else rng.uniform(-4, 4)
            return Const(value)
        return Var(rng.choice(visible))
    op = rng.choice(OPS)
    return Call(op, tuple(random_expr(rng, visible, depth - 1) for _ in range(ARITY[op])))


def random_program(rng: random.Random, max_depth: int = 6) -> Program:
    deltas = {}
    for target in STATES + ("weight",):
        if target == "weight" or rng.random() < 0.75:
            visible = sorted(VISIBLE[target])
            deltas[target] = random_expr(rng, visible, rng.randint(2, max_depth))
    return Program(**deltas)


def random_inputs(rng: np.random.Generator, n: int) -> np.ndarray:
    """Mostly ordinary values at several scales, about a third edge values."""
    scale = rng.choice([1e-3, 1.0, 1e3], size=n)
    values = (rng.standard_normal(n) * scale).astype(np.float32)
    edge = rng.random(n) < 0.3
    values[edge] = rng.choice(EDGE_VALUES, size=int(edge.sum()))
    return values
