"""The funnel (engine.fitness.tiers) on synthetic scorers and tiny budgets: the order across
tiers, promotion counts, racing at the top, resume mid-funnel, and the real micro scorer."""

from __future__ import annotations

import hashlib
import json

import pytest

from engine.fitness.tiers import (DEFAULT_TIERS, Funnel, FunnelState, Standing, Tier,
                                  micro_scorer, ranking)
from kernels import zoo

TIERS = (Tier("micro", ("m",), steps=10, promote=0.25, lr_scales=(0.5, 1.0, 2.0)),
         Tier("quick", ("q",), promote=0.5),
         Tier("top", ("q",), seeds=6, racing=True))
TEXTS = [f"candidate {i}" for i in range(16)]


def quality(text: str) -> float:
    """A fixed quality in [0.2, 0.9] per text."""
    return 0.2 + 0.7 * int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


class Synthetic:
    """Scores near each text's quality (tier and lr scale shift them a little, the seed adds
    noise); counts the jobs it was given."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.jobs: list[tuple] = []
        self.fail_after = fail_after

    def __call__(self, tier, jobs):
        if self.fail_after is not None and len(self.jobs) + len(jobs) > self.fail_after:
            raise KeyboardInterrupt("interrupted")
        self.jobs += [(tier.name, *j) for j in jobs]
        out = []
        for text, scale, seed in jobs:
            noise = int(hashlib.sha256(f"{text}{seed}".encode()).hexdigest()[:4], 16) / 0xFFFF
            out.append(quality(text) - 0.02 * abs(scale - 1.0) + 0.01 * (noise - 0.5))
        return out


def _funnel(scorer, state=None, checkpoint=None):
    return Funnel(TIERS, {t.name: scorer for t in TIERS}, state, checkpoint)


def test_promotion_counts_and_every_lr_scale_at_the_micro_tier():
    scorer = Synthetic()
    funnel = _funnel(scorer)
    standings = funnel.evaluate(TEXTS + TEXTS[:3])  # repeats are scored once
    assert len(standings) == 19 and standings[16] == standings[0]
    counts = funnel.state.counts[-1]
    assert [(c["evaluated"], c["promoted"]) for c in counts] == [(16, 4), (4, 2), (2, 0)]
    micro = [j for j in scorer.jobs if j[0] == "micro"]
    assert sorted((j[1], j[2]) for j in micro) == sorted((t, s) for t in TEXTS
                                                         for s in (0.5, 1.0, 2.0))
    assert [s.level for s in standings[:16]].count(2) == 2
    assert [s.level for s in standings[:16]].count(1) == 2
    # The promoted are the best of their tier: every micro-only candidate scored below them.
    micro_scores = {s.text: funnel.tier_score(TIERS[0], s.text) for s in standings}
    promoted = [s.text for s in standings if s.level >= 1]
    assert min(micro_scores[t] for t in promoted) >= max(
        micro_scores[s.text] for s in standings if s.level == 0)
    summary = funnel.summary()
    assert [(s["name"], s["evaluated"], s["promoted"]) for s in summary] == [
        ("micro", 16, 4), ("quick", 4, 2), ("top", 2, 0)]


def test_selection_order_is_total_and_ranks_tiers_first():
    funnel = _funnel(Synthetic())
    standings = funnel.evaluate(TEXTS)
    ranked = ranking(standings)
    levels = [s.level for s in ranked]
    assert levels == sorted(levels, reverse=True)  # every promoted one above every stopped one
    for a, b in zip(ranked, ranked[1:]):
        assert a.key < b.key  # strict: a total order, no ties
        assert a.fitness >= b.fitness  # the float says the same
        if a.level == b.level:
            assert a.score >= b.score
    # A perfect micro score still ranks below the worst promoted candidate.
    assert Standing("x", 0, 1.0, 0).fitness < Standing("y", 1, 0.0, 1).fitness


def test_racing_stops_a_clearly_worse_candidate_at_the_top():
    scores = {"best": 0.9, "worse": 0.5, "equal": 0.9}

    def scorer(tier, jobs):
        return [scores[t] + 0.001 * seed for t, _, seed in jobs]

    tiers = (Tier("micro", ("m",), promote=1.0), Tier("top", ("q",), seeds=6, racing=True))
    funnel = Funnel(tiers, {"micro": scorer, "top": scorer})
    funnel.evaluate(["best", "worse", "equal"])
    top_rows = [k for k in funnel.state.rows if k[1] == "top"]
    seeds = {t: sum(1 for k in top_rows if k[0] == t) for t in scores}
    assert seeds["best"] == 6 and seeds["equal"] == 6
    assert seeds["worse"] == 2  # the first seed count at which the exact test can reject


def test_resume_mid_funnel_gives_the_uninterrupted_result():
    whole = _funnel(Synthetic())
    expected = [whole.evaluate(TEXTS), whole.evaluate(TEXTS[4:] + ["new 1", "new 2"])]
    for fail_after in (10, 48, 53, 57, 62):  # before any row, at quick, racing, second call
        saved: list[str] = []
        scorer = Synthetic(fail_after)
        funnel = _funnel(scorer, checkpoint=lambda st: saved.append(json.dumps(st.to_json())))
        got = []
        try:
            got.append(funnel.evaluate(TEXTS))
            got.append(funnel.evaluate(TEXTS[4:] + ["new 1", "new 2"]))
        except KeyboardInterrupt:
            state = FunnelState.from_json(json.loads(saved[-1])) if saved else None
            again = Synthetic()
            funnel = _funnel(again, state)
            calls = [TEXTS, TEXTS[4:] + ["new 1", "new 2"]][len(got):]
            got += [funnel.evaluate(c) for c in calls]
            assert not set(again.jobs) & set(scorer.jobs)  # no row scored twice
        assert got == expected, fail_after


def test_a_later_promotion_reuses_the_lower_tier_rows():
    scorer = Synthetic()
    funnel = _funnel(scorer)
    funnel.evaluate(TEXTS)
    before = len(scorer.jobs)
    funnel.evaluate(TEXTS[:2])  # both promoted now (2 of 2 at 0.25 -> 1, then 1)
    new = scorer.jobs[before:]
    assert not [j for j in new if j[0] == "micro"]


def test_the_funnel_with_the_real_micro_scorer():
    tier = Tier("micro", ("digits-mlp",), steps=40, promote=0.5, lr_scales=(0.1, 1.0))
    quick = Tier("quick", ("digits-mlp",), steps=40)
    funnel = Funnel((tier, quick), {"micro": micro_scorer(tier), "quick": micro_scorer(quick)})
    texts = [str(zoo.sgd()), str(zoo.adam()), "alpha: sub(mul(-99.0, alpha), grad)\n"
             "weight: mul(lr, alpha)", str(zoo.momentum())]
    standings = funnel.evaluate(texts)
    assert standings[2].level == 0 and standings[2].score == 0.0  # diverged at every lr
    assert sum(s.level for s in standings) == 2


def test_bad_tiers_are_clear_errors():
    with pytest.raises(ValueError, match="promote is a fraction"):
        Tier("micro", ("m",), promote=1.5)
    with pytest.raises(ValueError, match="lr_scales"):
        Tier("micro", ("m",), lr_scales=(0.0,))
    with pytest.raises(ValueError, match="no scorer for tier"):
        Funnel(TIERS, {"micro": Synthetic()})
    with pytest.raises(ValueError, match="distinct"):
        Funnel((TIERS[0], TIERS[0]), {"micro": Synthetic()})
    assert [Tier.from_json(t.to_json()) for t in DEFAULT_TIERS] == list(DEFAULT_TIERS)


def test_split_fitness_gives_back_the_tier_and_score_of_every_standing():
    from engine.fitness.tiers import split_fitness

    for level in range(4):
        for score in (0.0, 0.25, 0.8167, 1.0):
            standing = Standing(text="t", level=level, score=score, order=0)
            got_level, got_score = split_fitness(standing.fitness)
            assert got_level == level and got_score == pytest.approx(score, abs=1e-12)
