"""Racing: stop a promoted candidate's repeated evaluations once it cannot beat its incumbent.

At the top tier a candidate is trained on several seeds, each as expensive as a whole quick
evaluation, and most promoted candidates are still worse than the best one known (the
incumbent). Racing (as in F-Race and the original system's later work) spends seeds only while
the question is open: after each new seed, a one-sided Mann-Whitney U test asks whether the
candidate's scores so far are stochastically smaller than the incumbent's.

"Cannot beat", precisely: with the candidate's scores X (those seen so far) and the incumbent's
scores Y (all of its seeds), the one-sided Mann-Whitney U test of H0 "X is not stochastically
smaller than Y" against H1 "X is stochastically smaller than Y" (P(X < Y) > P(X > Y)) rejects
H0 at level `alpha` (p < alpha; exact p-values without ties, the normal approximation with tie
correction otherwise). Then the candidate stops: its remaining seeds are not run. Scores are
"higher is better" (accuracies); a NaN score (a failed seed) counts as below every number.

Consequences worth knowing: a candidate equal to the incumbent is stopped only by chance (at most
`alpha` of the time for continuous scores), a better one essentially never; and with few seeds
the test cannot reject at all (1 candidate seed against 5 of the incumbent: the smallest exact p
is 1/6), so a race always runs at least `min_seeds(len(Y), alpha)` seeds before it can stop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["ALPHA", "RaceResult", "cannot_beat", "min_seeds", "race"]

ALPHA = 0.05


def _clean(scores: Sequence[float], name: str) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError(f"{name} needs at least one score")
    return np.where(np.isnan(values), -np.inf, values)


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and 0.0 < alpha < 1.0):
        raise ValueError(f"alpha is a significance level in (0, 1), got {alpha!r}")


def p_value(candidate: Sequence[float], incumbent: Sequence[float]) -> float:
    """The one-sided Mann-Whitney p-value of "the candidate's scores are stochastically smaller
    than the incumbent's" (small: the candidate is worse)."""
    from scipy.stats import mannwhitneyu

    x, y = _clean(candidate, "candidate"), _clean(incumbent, "incumbent")
    both = np.concatenate([x, y])
    if np.all(both == both[0]):
        return 1.0  # all equal: no evidence either way (scipy would divide by a zero variance)
    # scipy's ranks of -inf are fine; its exact method assumes no ties, so ties go asymptotic.
    method = "exact" if np.unique(both).size == both.size else "asymptotic"
    return float(mannwhitneyu(x, y, alternative="less", method=method).pvalue)


def cannot_beat(candidate: Sequence[float], incumbent: Sequence[float],
                alpha: float = ALPHA) -> bool:
    """Whether the test rejects, at level `alpha`, that the candidate is at least as good as the
    incumbent (module docstring)."""
    _check_alpha(alpha)
    return p_value(candidate, incumbent) < alpha


def min_seeds(incumbent_seeds: int, alpha: float = ALPHA) -> int | None:
    """The fewest candidate seeds with which the exact test can reject at all (every candidate
    score below every incumbent one: p = 1 / C(n + m, n)); None if no number up to
    `incumbent_seeds` + 20 can."""
    _check_alpha(alpha)
    for n in range(1, incumbent_seeds + 21):
        if 1.0 / math.comb(n + incumbent_seeds, n) < alpha:
            return n
    return None


@dataclass(frozen=True)
class RaceResult:
    """The candidate's scores in seed order (only the seeds run), whether it stopped early, and
    the last p-value computed (1.0 when none was)."""

    scores: tuple[float, ...]
    stopped: bool
    p_value: float

    @property
    def seeds_run(self) -> int:
        return len(self.scores)


def race(evaluate: Callable[[int], float], seeds: Sequence[int], incumbent: Sequence[float],
         alpha: float = ALPHA) -> RaceResult:
    """Evaluate the candidate on `seeds` in order (`evaluate(seed)` -> score, higher is better),
    stopping after the first seed at which it `cannot_beat` the incumbent's scores."""
    _check_alpha(alpha)
    incumbent = list(incumbent)
    _clean(incumbent, "incumbent")
    if not seeds:
        raise ValueError("race needs at least one seed")
    scores: list[float] = []
    p = 1.0
    for seed in seeds:
        scores.append(float(evaluate(seed)))
        p = p_value(scores, incumbent)
        if p < alpha and len(scores) < len(seeds):
            return RaceResult(tuple(scores), True, p)
    return RaceResult(tuple(scores), False, p)
