"""Paired statistics for `engine.compare`: is optimizer A better than baseline B on the same seeds?

Every optimizer in a comparison trains on the same seeds (seed k fixes the initial weights, the
batch order and the dropout masks for every row), so seed k of A and seed k of B differ only in
the update rule. Testing the per-seed differences removes each seed's own luck, which a rank-sum
test on the two samples could not; pairing is by seed number, never by position in a list.

The choices, made once here so that every table makes the same ones:

- Test: Wilcoxon signed-rank on d = A - B, two-sided (whether A is better or worse is then read
  from the rank sums). A one-sided "A better than B" test would halve p, but the direction would
  be chosen by the person who built A; a sceptical reader should not have to trust that.
- Zero differences (two seeds that both diverged, or scored the same): Pratt's method, so they
  take the lowest ranks and then drop out of the statistic. Discarding them first (Wilcoxon's
  method) would test only the seeds that differ and overstate the evidence when many are equal.
- p-value: exact null distribution when the |d| are distinct and nonzero (n <= 50); with ties or
  zeros, all 2^n sign flips (n <= 13: exact given the ties); beyond, the normal approximation with
  scipy's tie and zero adjustment. Differences are rounded to 12 decimals first, so that accuracies
  equal in exact arithmetic tie after floating-point subtraction.
- Multiple comparisons: Holm's step-down correction over every comparison of a table.
- Effect size: median and mean of the paired differences, with a seeded percentile bootstrap 95%
  interval that resamples seed pairs. Percentile rather than BCa: with ~10 seeds and accuracies on
  a grid of 1/N_test, the jackknife that BCa needs is often degenerate (many equal leave-one-out
  medians), while the percentile interval stays defined and monotone in the data.
- Divergence: a run that diverged has no score; it is given the floor (the caller's, e.g.
  accuracy 0) and counted. It is never dropped, since dropping it would reward an optimizer for
  its failures.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["DECIMALS", "EDGE_FRACTION", "Interval", "Paired", "SignedRank", "align", "at_edge",
           "bootstrap_ci", "compare_pair", "holm", "signed_rank", "smallest_p"]

DECIMALS = 12  # differences are rounded to this many decimals before ranking
EXACT_MAX, PERMUTE_MAX = 50, 13  # largest n for the exact null / for all 2^n sign flips
EDGE_FRACTION = 0.05  # of the log-range: a tuned value this close to an end is "at the edge"

Score = float | None  # None (or a non-finite number): the run diverged


@dataclass(frozen=True)
class Paired:
    """Scores of A and B aligned by seed, diverged runs already at the floor."""

    seeds: tuple[int, ...]
    a: np.ndarray
    b: np.ndarray
    diverged_a: int
    diverged_b: int

    @property
    def diff(self) -> np.ndarray:
        return np.round(self.a - self.b, DECIMALS)


def _scores(results: Iterable[tuple[int, Score]], side: str, floor: float) -> tuple[dict, int]:
    by_seed: dict[int, float] = {}
    diverged = 0
    for seed, score in results:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"{side}: seed {seed!r} is not an integer")
        if seed in by_seed:
            raise ValueError(f"{side}: seed {seed} appears twice; each seed must be run once")
        if score is None or not math.isfinite(score):
            diverged += 1
            score = floor
        by_seed[int(seed)] = float(score)
    return by_seed, diverged


def align(a: Iterable[tuple[int, Score]], b: Iterable[tuple[int, Score]],
          floor: float) -> Paired:
    """Pairs (seed, score) results of A and B by seed, in seed order.

    A score of None or a non-finite one is a diverged run: it scores `floor` and is counted.
    Seeds that only one side ran are a ValueError naming them: an unpaired seed cannot be
    compared, and silently dropping it would hide a run that crashed or was never made."""
    if not math.isfinite(floor):
        raise ValueError(f"floor must be a finite score, got {floor!r}")
    mine, div_a = _scores(a, "A", floor)
    theirs, div_b = _scores(b, "B", floor)
    only_a, only_b = sorted(mine.keys() - theirs.keys()), sorted(theirs.keys() - mine.keys())
    if only_a or only_b:
        raise ValueError(f"seeds do not pair: only A ran {only_a or 'none'}, only B ran "
                         f"{only_b or 'none'}; run both on the same seeds")
    if not mine:
        raise ValueError("no seeds to compare")
    seeds = tuple(sorted(mine))
    return Paired(seeds, np.array([mine[s] for s in seeds]), np.array([theirs[s] for s in seeds]),
                  div_a, div_b)


@dataclass(frozen=True)
class SignedRank:
    """A Wilcoxon signed-rank test of paired differences (Pratt's zero handling)."""

    n: int  # pairs, zeros included
    zeros: int
    w_plus: float  # rank sum of the positive differences (ranks over all |d|, zeros included)
    w_minus: float
    pvalue: float
    alternative: str
    method: str  # "exact", "all 2^n sign flips", "normal approximation" or "all differences 0"

    @property
    def direction(self) -> int:
        """+1 if A's differences dominate (A better), -1 if B's, 0 if balanced."""
        return int(np.sign(self.w_plus - self.w_minus))


def signed_rank(diff: Sequence[float], alternative: str = "two-sided") -> SignedRank:
    """Wilcoxon signed-rank test of `diff` (A - B per seed); see the module notes for choices."""
    from scipy.stats import PermutationMethod, rankdata, wilcoxon

    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be two-sided, greater or less, got {alternative!r}")
    d = np.round(np.asarray(diff, dtype=float), DECIMALS)
    if d.ndim != 1 or d.size == 0 or not np.all(np.isfinite(d)):
        raise ValueError("need a non-empty 1-D sequence of finite differences")
    ranks = rankdata(np.abs(d))
    w_plus, w_minus = float(ranks[d > 0].sum()), float(ranks[d < 0].sum())
    zeros = int(np.sum(d == 0))
    if zeros == d.size:
        return SignedRank(d.size, zeros, 0.0, 0.0, 1.0, alternative, "all differences 0")
    nonzero = np.abs(d[d != 0])
    ties = zeros > 0 or len(np.unique(nonzero)) < nonzero.size
    if not ties and d.size <= EXACT_MAX:
        method, how = "exact", "exact"
    elif d.size <= PERMUTE_MAX:
        method, how = PermutationMethod(n_resamples=2 ** d.size), "all 2^n sign flips"
    else:
        method, how = "asymptotic", "normal approximation"
    result = wilcoxon(d, zero_method="pratt", alternative=alternative, method=method)
    return SignedRank(d.size, zeros, w_plus, w_minus, float(min(1.0, result.pvalue)),
                      alternative, how)


def smallest_p(n: int) -> float:
    """The smallest two-sided p a signed-rank test of n pairs can give: every sign the same."""
    return min(1.0, 2.0 / 2 ** n)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order.

    Sorted ascending, the i-th smallest (0-based) is multiplied by (m - i), capped at 1, and made
    non-decreasing (each adjusted value is the running maximum), so that rejecting where the
    adjusted p < alpha is Holm's step-down procedure at family-wise error alpha."""
    p = np.asarray(pvalues, dtype=float)
    if p.ndim != 1 or not np.all((p >= 0) & (p <= 1)):
        raise ValueError(f"p-values must be a 1-D sequence in [0, 1], got {list(pvalues)!r}")
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return [float(v) for v in out]


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    level: float = 0.95


def bootstrap_ci(diff: Sequence[float], statistic: str = "median", seed: int = 0,
                 resamples: int = 10_000, level: float = 0.95) -> Interval:
    """Percentile bootstrap interval of the median or mean of paired differences.

    Resamples seed pairs (whole differences) with replacement from a generator seeded by `seed`,
    so the interval is reproducible."""
    funcs = {"median": np.median, "mean": np.mean}
    if statistic not in funcs:
        raise ValueError(f"statistic must be median or mean, got {statistic!r}")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"need 0 < level < 1 and resamples >= 1, got {level}, {resamples}")
    d = np.asarray(diff, dtype=float)
    if d.ndim != 1 or d.size == 0 or not np.all(np.isfinite(d)):
        raise ValueError("need a non-empty 1-D sequence of finite differences")
    func = funcs[statistic]
    rng = np.random.default_rng(seed)
    draws = func(d[rng.integers(0, d.size, size=(resamples, d.size))], axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Interval(float(func(d)), float(low), float(high), level)


def at_edge(value: float, low: float, high: float, fraction: float = EDGE_FRACTION) -> str | None:
    """"low" or "high" if `value` lies within `fraction` of the log-range [low, high] of that end.

    A tuned value there suggests the best value may lie outside the searched range."""
    if not 0 < low < high or not 0 < fraction < 0.5 or not value > 0:
        raise ValueError(f"need value > 0, 0 < low < high and 0 < fraction < 0.5, got {value}, "
                         f"{low}, {high}, {fraction}")
    span = math.log(high) - math.log(low)
    where = (math.log(value) - math.log(low)) / span
    if where <= fraction:
        return "low"
    if where >= 1 - fraction:
        return "high"
    return None


def compare_pair(a: Iterable[tuple[int, Score]], b: Iterable[tuple[int, Score]], floor: float,
                 seed: int = 0, resamples: int = 10_000) -> dict:
    """Everything a table says about A against B, as plain numbers (JSON-ready).

    `p` is two-sided and uncorrected; the caller applies `holm` across its table."""
    pair = align(a, b, floor)
    diff = pair.diff
    test = signed_rank(diff)
    median, mean = (bootstrap_ci(diff, s, seed, resamples) for s in ("median", "mean"))
    return {"n": len(pair.seeds), "diverged": [pair.diverged_a, pair.diverged_b],
            "wins": int(np.sum(diff > 0)), "ties": int(np.sum(diff == 0)),
            "losses": int(np.sum(diff < 0)),
            "median": dataclasses.asdict(median), "mean": dataclasses.asdict(mean),
            "w_plus": test.w_plus, "w_minus": test.w_minus, "direction": test.direction,
            "p": test.pvalue, "p_method": test.method}
