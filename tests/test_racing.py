"""Racing (engine.fitness.racing) on seeded synthetic scores: it stops a clearly worse
candidate early, runs an equal one to the end, and never stops a better one."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.fitness.racing import cannot_beat, min_seeds, p_value, race

SEEDS = list(range(10))


def _scores(mean: float, rng: np.random.Generator, n: int = 10) -> list[float]:
    return (mean + 0.01 * rng.standard_normal(n)).tolist()


def _race(mean: float, incumbent: list[float], rng: np.random.Generator):
    draws = iter(_scores(mean, rng))
    calls = []

    def evaluate(seed: int) -> float:
        calls.append(seed)
        return next(draws)
    return race(evaluate, SEEDS, incumbent), calls


def test_a_clearly_worse_candidate_stops_early():
    for trial in range(20):
        rng = np.random.default_rng(trial)
        incumbent = _scores(0.85, rng, 5)
        result, calls = _race(0.80, incumbent, rng)
        assert result.stopped and result.p_value < 0.05
        # Every score below every incumbent one: the exact test rejects at the first chance.
        assert result.seeds_run == min_seeds(5) == 2 and calls == SEEDS[:2]


def test_an_equal_candidate_runs_to_the_end():
    stopped = 0
    for trial in range(40):
        rng = np.random.default_rng(100 + trial)
        incumbent = _scores(0.85, rng, 5)
        result, calls = _race(0.85, incumbent, rng)
        stopped += result.stopped
        if not result.stopped:
            assert calls == SEEDS and result.seeds_run == len(SEEDS)
    # Each look rejects with probability < 0.05 under H0; nine looks make it a few per cent.
    assert stopped <= 4, stopped


def test_a_better_candidate_never_stops():
    for trial in range(40):
        rng = np.random.default_rng(200 + trial)
        incumbent = _scores(0.85, rng, 5)
        result, calls = _race(0.87, incumbent, rng)
        assert not result.stopped and calls == SEEDS and result.p_value > 0.5


def test_the_test_is_one_sided_and_nan_is_worst():
    low, high = [0.1, 0.2, 0.3], [0.7, 0.8, 0.9, 1.0]
    assert cannot_beat(low, high) and not cannot_beat(high, low)
    assert p_value([math.nan, 0.2, 0.3], high) == p_value([-5.0, 0.2, 0.3], high)
    assert p_value([0.5] * 3, [0.5] * 4) == 1.0  # all tied: no evidence
    with_ties = p_value([0.5, 0.5, 0.4], [0.6, 0.6, 0.7, 0.7])
    assert 0.0 < with_ties < 0.05


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="alpha"):
        cannot_beat([1.0], [1.0], alpha=1.5)
    with pytest.raises(ValueError, match="at least one seed"):
        race(lambda s: 1.0, [], [0.5])
    with pytest.raises(ValueError, match="incumbent needs at least one score"):
        race(lambda s: 1.0, [1], [])
