"""Fidelity tiers and the funnel: cheap scores for every candidate, expensive ones for the best.

A run's tiers are data (`Tier`): the micro tier (every new candidate, each lr scale, a stacked
training with the IR interpreter: engine.fitness.micro), then today's quick training for the best
fraction of those, then the top tier (several seeds, raced against the incumbent:
engine.fitness.racing) for the best of those. The funnel is independent of how a tier scores:
it is given one `Scorer` per tier name, which maps jobs (program text, lr scale, seed) to scores
(accuracies in [0, 1], higher is better; NaN counts as 0).

Rows: every score is kept as one row per (candidate, tier, lr scale, seed) in `FunnelState`;
a job whose row exists is never scored again. So a candidate promoted later reuses its
lower-tier rows, and resuming is re-running: restore the state from its JSON (saved by the
`checkpoint` callback after every scorer call) and call `evaluate` with the same candidates;
every promotion decision is a function of the rows, so the result is the uninterrupted one.

Selection fitness (`Standing`): a candidate ranks by the highest tier it reached, then by its
score there (the mean over seeds of its best lr scale), then by its first appearance: a total
order in which every candidate that stopped at a lower tier ranks below every promoted one.
`Standing.fitness` is the same order as one float for the search's selection: 2 * level + score.

Integration (for the evaluator; not wired here): build a `Funnel` once per run from the preset's
tiers with scorers for "micro" (`micro_scorer(tier)`), and for the quick and top tiers the
evaluator's existing training of one candidate per seed; call `funnel.evaluate(texts)` where a
generation's new texts are scored today, use `Standing.fitness` as each text's fitness, write
`funnel.state.to_json()` next to the run's checkpoint, and `funnel.summary()` into summary.json's
"tiers".
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from engine.fitness.racing import ALPHA, p_value

__all__ = ["DEFAULT_TIERS", "Funnel", "FunnelState", "Scorer", "Standing", "Tier", "Job",
           "split_fitness",
           "micro_scorer", "ranking"]

Job = tuple[str, float, int]  # program text, lr scale, seed
Scorer = Callable[["Tier", Sequence[Job]], Sequence[float]]


@dataclass(frozen=True)
class Tier:
    """One fidelity level. `tasks` and `steps`/`epochs` say what its scorer trains (micro tasks
    by name and optimizer steps; a preset's name and epochs); `seeds` how many training seeds
    each candidate gets; `promote` the fraction of the candidates it scores in a generation that
    go on to the next tier (rounded up; the last tier's is ignored); `lr_scales` the step size
    scales each candidate is tried at (its score is the best scale's mean over seeds, and that
    scale is its `Standing.lr_scale`); `racing`: seeds stop as soon as the candidate cannot beat
    the incumbent (engine.fitness.racing); `normalise`: each task's score is taken relative to
    the mode's baseline (Adam for ALR) trained at the same scales and seeds, and a job's score
    is the minimum over the tier's tasks (engine.fitness.funnel says how); `refine`: the
    `lr_scales` are factors around each candidate's best scale at the tier before (a finer grid
    where the coarse one found the candidate's step size), not scales of their own."""

    name: str
    tasks: tuple[str, ...]
    steps: int | None = None
    epochs: int | None = None
    seeds: int = 1
    promote: float = 0.25
    lr_scales: tuple[float, ...] = (1.0,)
    racing: bool = False
    normalise: bool = False
    refine: bool = False

    def __post_init__(self) -> None:
        if not self.name or not self.tasks:
            raise ValueError(f"a tier needs a name and at least one task, got {self!r}")
        if self.seeds < 1:
            raise ValueError(f"tier {self.name!r}: seeds must be >= 1, got {self.seeds}")
        if not 0.0 <= self.promote <= 1.0:
            raise ValueError(f"tier {self.name!r}: promote is a fraction in [0, 1], got "
                             f"{self.promote}")
        if not self.lr_scales or not all(math.isfinite(s) and s > 0 for s in self.lr_scales):
            raise ValueError(f"tier {self.name!r}: lr_scales must be positive numbers, got "
                             f"{self.lr_scales}")

    def to_json(self) -> dict:
        return {"name": self.name, "tasks": list(self.tasks), "steps": self.steps,
                "epochs": self.epochs, "seeds": self.seeds, "promote": self.promote,
                "lr_scales": list(self.lr_scales), "racing": self.racing,
                "normalise": self.normalise, "refine": self.refine}

    @classmethod
    def from_json(cls, data: Mapping) -> "Tier":
        return cls(data["name"], tuple(data["tasks"]), data.get("steps"), data.get("epochs"),
                   data.get("seeds", 1), data.get("promote", 0.25),
                   tuple(data.get("lr_scales", (1.0,))), data.get("racing", False),
                   data.get("normalise", False), data.get("refine", False))


# Measured defaults (BENCHMARKS.md, "Fidelity tiers"): of the micro tiers tried against the quick
# tier's fitness on 220 programs, a 784-64-32-10 MLP on the quick preset's own images for 90
# steps (3 epochs of its first chunk) agreed best per unit of time (Spearman 0.82, all of the
# quick top 10 in its top 25%, ~60 ms a candidate on one core); one lr scale, the one the quick
# tier trains at (the best of three lr scales predicted worse: 0.63 against 0.73 for the 1-layer
# MLP). The fractions keep the quick tier's share of the work near today's per generation.
DEFAULT_TIERS = (
    Tier("micro", ("fashion28-deep",), steps=90, promote=0.25),
    Tier("quick", ("quick",), promote=0.2),
    Tier("top", ("quick",), seeds=5, racing=True),
)


def micro_scorer(tier: Tier, *, seed: int = 0) -> Scorer:
    """The micro tier's scorer: every job of a call in stacked trainings (engine.fitness.micro),
    one per training seed (the run seed plus the job's)."""
    def score(tier: Tier, jobs: Sequence[Job]) -> list[float]:
        from engine.fitness.micro import score_micro

        out = [0.0] * len(jobs)
        for s in sorted({j[2] for j in jobs}):
            index = [i for i, j in enumerate(jobs) if j[2] == s]
            values = score_micro(tier.tasks, tier.steps or DEFAULT_TIERS[0].steps,
                                 [(jobs[i][0], jobs[i][1]) for i in index], seed=seed + s)
            for i, v in zip(index, values):
                out[i] = v
        return out
    return score


@dataclass(order=False, frozen=True)
class Standing:
    """A candidate's place in the funnel: the highest tier it reached (`level`, 0 = first),
    its score there, and the order it was first seen in (the last tie-break)."""

    text: str
    level: int
    score: float
    order: int
    lr_scale: float = 1.0  # the best step size scale at its tier (Tier.lr_scales)

    @property
    def key(self) -> tuple[int, float, int]:
        """Sort ascending by this for best first."""
        return (-self.level, -self.score, self.order)

    @property
    def fitness(self) -> float:
        return 2.0 * self.level + self.score


def split_fitness(fitness: float) -> tuple[int, float]:
    """(tier level, score there) of a `Standing.fitness`: what a reader wants to see instead of
    the selection's single float. Scores lie in [0, 1], so the level is the even part."""
    level = max(0, int(fitness // 2))
    return level, fitness - 2.0 * level


def ranking(standings: Sequence[Standing]) -> list[Standing]:
    """Best first, in the funnel's total order."""
    return sorted(standings, key=lambda s: s.key)


def _score(value: float) -> float:
    return 0.0 if not math.isfinite(value) else min(max(float(value), 0.0), 1.0)


@dataclass
class FunnelState:
    """Every row scored so far, and who was seen first: all a funnel needs to resume."""

    rows: dict[tuple[str, str, float, int], float] = field(default_factory=dict)
    order: dict[str, int] = field(default_factory=dict)
    counts: list[dict] = field(default_factory=list)  # per evaluate(): per tier, the figures

    def to_json(self) -> dict:
        return {"rows": [[t, tier, scale, seed, v]
                         for (t, tier, scale, seed), v in self.rows.items()],
                "order": list(self.order), "counts": self.counts}

    @classmethod
    def from_json(cls, data: Mapping) -> "FunnelState":
        rows = {(t, tier, float(scale), int(seed)): float(v)
                for t, tier, scale, seed, v in data["rows"]}
        return cls(rows, {t: i for i, t in enumerate(data["order"])}, list(data["counts"]))


class Funnel:
    """Runs candidates through `tiers` with one scorer per tier name (module docstring)."""

    def __init__(self, tiers: Sequence[Tier], scorers: Mapping[str, Scorer],
                 state: FunnelState | None = None,
                 checkpoint: Callable[[FunnelState], None] | None = None,
                 alpha: float = ALPHA) -> None:
        if not tiers:
            raise ValueError("a funnel needs at least one tier")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be distinct, got {names}")
        missing = [n for n in names if n not in scorers]
        if missing:
            raise ValueError(f"no scorer for tier(s) {', '.join(missing)}")
        if tiers[0].refine:
            raise ValueError(f"tier {tiers[0].name!r} refines the scale of the tier before it, "
                             "but it is the first")
        self.tiers, self.scorers = list(tiers), dict(scorers)
        self.state = state or FunnelState()
        self.checkpoint, self.alpha = checkpoint, alpha

    # --- scoring with the rows as a cache ---

    def _run(self, tier: Tier, jobs: list[Job]) -> None:
        todo = [j for j in dict.fromkeys(jobs) if (j[0], tier.name, j[1], j[2])
                not in self.state.rows]
        if not todo:
            return
        values = list(self.scorers[tier.name](tier, todo))
        if len(values) != len(todo):
            raise ValueError(f"the scorer of tier {tier.name!r} returned {len(values)} scores "
                             f"for {len(todo)} jobs")
        for (text, scale, seed), value in zip(todo, values):
            self.state.rows[(text, tier.name, float(scale), int(seed))] = _score(value)
        if self.checkpoint is not None:
            self.checkpoint(self.state)

    def scales(self, tier: Tier, text: str) -> tuple[float, ...]:
        """The step size scales `text` is tried at on `tier`: its own, or (Tier.refine) its
        factors times the text's best scale at the tier before (12 significant digits, so that
        the same product is the same row key every time)."""
        if not tier.refine:
            return tier.lr_scales
        before = self.tiers[self.tiers.index(tier) - 1]
        base = self.best_scale(before, text)
        return tuple(float(f"{base * f:.12g}") for f in tier.lr_scales)

    def reference_scales(self, tier: Tier) -> tuple[float, ...]:
        """The grid a baseline is tuned over for `tier`: its own scales, or for a refining
        tier those of the nearest tier before it that has a grid of its own."""
        index = self.tiers.index(tier)
        while self.tiers[index].refine:
            index -= 1
        return self.tiers[index].lr_scales

    def _done(self, tier: Tier, text: str, seeds: range) -> list[dict[float, float]]:
        """Per seed run so far at every scale (in order): scale -> score."""
        scales, out = self.scales(tier, text), []
        for seed in seeds:
            values = [self.state.rows.get((text, tier.name, float(s), seed)) for s in scales]
            if any(v is None for v in values):
                break
            out.append(dict(zip(scales, values)))
        return out

    def best_scale(self, tier: Tier, text: str, seeds: range | None = None) -> float:
        """The scale whose mean over the seeds run at every scale is highest (ties: the scale
        nearest 1 in log space, then the first listed). A program's step size is one choice
        for all seeds, as a user's lr is: picking each seed's best scale would score the luck
        of the seeds."""
        done = self._done(tier, text, range(tier.seeds) if seeds is None else seeds)
        return self._pick(self.scales(tier, text), done)

    @staticmethod
    def _pick(scales: tuple[float, ...], done: list[dict[float, float]]) -> float:
        if not done:
            return float(min(scales, key=lambda s: abs(math.log(s))))
        return float(max(scales, key=lambda s: (sum(d[s] for d in done), -abs(math.log(s)))))

    def _seed_scores(self, tier: Tier, text: str, seeds: range) -> list[float]:
        """Per seed run so far (in order, every scale done), the score at the best scale."""
        done = self._done(tier, text, seeds)
        scale = self._pick(self.scales(tier, text), done)
        return [d[scale] for d in done]

    def tier_score(self, tier: Tier, text: str) -> float | None:
        seeds = self._seed_scores(tier, text, range(tier.seeds))
        return sum(seeds) / len(seeds) if seeds else None

    # --- the funnel ---

    def evaluate(self, texts: Sequence[str]) -> list[Standing]:
        """Each text's standing after running it through the tiers (one per text, in order).
        Promotion is within this call's distinct texts."""
        distinct = list(dict.fromkeys(texts))
        for text in distinct:
            self.state.order.setdefault(text, len(self.state.order))
        counts = []
        level = {text: 0 for text in distinct}
        current = distinct
        for index, tier in enumerate(self.tiers):
            start = time.perf_counter()
            if tier.racing:
                self._race(tier, current)
            else:
                self._run(tier, [(t, s, seed) for seed in range(tier.seeds) for t in current
                                 for s in self.scales(tier, t)])
            for text in current:
                level[text] = index
            last = index == len(self.tiers) - 1
            ranked = sorted(current, key=lambda t: (-self.tier_score(tier, t),
                                                    self.state.order[t]))
            n = 0 if last else math.ceil(tier.promote * len(ranked))
            counts.append({"name": tier.name, "evaluated": len(current), "promoted": n,
                           "seconds": time.perf_counter() - start})
            current = ranked[:n]
            if not current:
                break
        counts += [{"name": t.name, "evaluated": 0, "promoted": 0, "seconds": 0.0}
                   for t in self.tiers[len(counts):]]
        self.state.counts.append(counts)
        if self.checkpoint is not None:
            self.checkpoint(self.state)
        standings = {t: Standing(t, level[t], self.tier_score(self.tiers[level[t]], t),
                                 self.state.order[t],
                                 self.best_scale(self.tiers[level[t]], t)) for t in distinct}
        return [standings[t] for t in texts]

    def _race(self, tier: Tier, texts: list[str]) -> None:
        """Seeds one at a time, best candidate first. The incumbent is the best candidate
        that ran all its seeds at this tier (in this call or before); a candidate stops once
        it cannot beat the incumbent's per-seed scores (engine.fitness.racing)."""
        seeds = range(tier.seeds)

        def strength(text: str) -> tuple[float, int]:
            return (self.tier_score(tier, text), -self.state.order[text])

        # The same rule whether decided now or before an interruption: the strongest finisher.
        incumbent = max((t for t in self.state.order
                         if len(self._seed_scores(tier, t, seeds)) == tier.seeds),
                        key=strength, default=None)
        for text in texts:
            for seed in seeds:
                self._run(tier, [(text, s, seed) for s in self.scales(tier, text)])
                mine = self._seed_scores(tier, text, seeds)
                if incumbent is not None and text != incumbent and seed + 1 < tier.seeds:
                    theirs = self._seed_scores(tier, incumbent, seeds)
                    if p_value(mine, theirs) < self.alpha:
                        break
            else:
                if incumbent is None or strength(text) > strength(incumbent):
                    incumbent = text

    def summary(self) -> list[dict]:
        """Per tier: candidates evaluated and promoted, seconds, over every evaluate() so far
        (summary.json's "tiers")."""
        out = [{"name": t.name, "evaluated": 0, "promoted": 0, "seconds": 0.0}
               for t in self.tiers]
        for counts in self.state.counts:
            for total, c in zip(out, counts):
                for k in ("evaluated", "promoted", "seconds"):
                    total[k] += c[k]
        return out
