"""lr-normalised and multi-task fitness (engine.fitness.funnel): the step size grid finds a
program's best scale whatever step it has built in, the baseline scores exactly a tie against
itself on every task, the aggregate never rewards a candidate that fails one task, DLR's scaled
schedules, and --tiers given by the user, end to end."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings, strategies as st

from codegen.ir import Program, Schedule
from engine import modes
from engine.evolution.seeds import with_lr
from engine.exec.serial import SerialExecutor
from engine.fitness.evaluator import Evaluator
from engine.fitness.funnel import (FunnelFitness, aggregate, read_state, relative,
                                   task_definition)
from engine.fitness.store import Store
from engine.fitness.tiers import Funnel, Tier, micro_scorer
from engine.modes import scaled_schedule
from kernels import zoo
from tests.test_run import engine_run, env  # noqa: F401  (env is a fixture)


def adam_at(lr: float) -> str:
    """Adam with its step size written in as the constant `lr` (the program never reads lr)."""
    p = zoo.adam()
    return str(Program(**{t: (None if getattr(p, t) is None else with_lr(getattr(p, t), lr))
                          for t in ("alpha", "beta", "sigma", "weight")}))


# -- the grid -------------------------------------------------------------------------------------

def test_the_grid_finds_the_same_step_whatever_step_is_built_in():
    """Adam written with a step 10x too small, right, or 10x too large: the grid's best scale
    times the built-in step is the same effective step size for all three."""
    grid = tuple(10.0 ** k for k in range(-2, 3))
    tier = Tier("micro", ("fashion28-deep",), steps=90, lr_scales=grid)
    funnel = Funnel((tier,), {"micro": micro_scorer(tier)})
    texts = {lr: adam_at(lr) for lr in (1e-4, 1e-3, 1e-2)}
    standings = dict(zip(texts, funnel.evaluate(list(texts.values()))))
    effective = {lr: lr * s.lr_scale for lr, s in standings.items()}
    assert len({round(math.log10(e), 6) for e in effective.values()}) == 1, effective
    assert standings[1e-4].lr_scale == 100 * standings[1e-2].lr_scale
    assert len({round(s.score, 6) for s in standings.values()}) == 1  # one training, thrice


def test_one_scale_for_all_seeds_not_each_seeds_luckiest():
    """The score is the best scale's mean over seeds, at that one scale (as a user picks one lr),
    not the mean of every seed's own best scale."""
    tier = Tier("t", ("x",), seeds=2, lr_scales=(1.0, 2.0))
    rows = {1.0: (0.9, 0.1), 2.0: (0.2, 0.7)}  # means 0.5 and 0.45; per-seed best 0.9, 0.7

    def score(tier, jobs):
        return [rows[scale][seed] for _, scale, seed in jobs]

    [standing] = Funnel((tier,), {"t": score}).evaluate(["p"])
    assert standing.lr_scale == 1.0 and standing.score == pytest.approx(0.5)


def test_a_refining_tier_searches_around_the_coarse_best():
    """Tier.refine: the next tier's grid is factors around the scale the tier before found;
    the score peaks at scale 3 here, between the coarse grid's points."""
    def score(tier, jobs):
        return [1.0 - abs(math.log10(scale / 3.0)) / 4 for _, scale, _ in jobs]

    coarse = Tier("coarse", ("x",), lr_scales=(0.1, 1.0, 10.0), promote=1.0)
    fine = Tier("fine", ("x",), lr_scales=(10 ** -0.5, 1.0, 10 ** 0.5), refine=True)
    funnel = Funnel((coarse, fine), {"coarse": score, "fine": score})
    [standing] = funnel.evaluate(["p"])
    assert funnel.scales(fine, "p") == (0.316227766017, 1.0, 3.16227766017)
    assert standing.level == 1 and standing.lr_scale == 3.16227766017
    assert funnel.reference_scales(fine) == coarse.lr_scales
    with pytest.raises(ValueError, match="it is the first"):
        Funnel((fine,), {"fine": score})


# -- normalising against the baseline, over tasks -------------------------------------------------

@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 0.999)), min_size=1, max_size=5),
       st.integers(0, 4), st.floats(0, 1))
@settings(max_examples=200, deadline=None)
def test_a_failed_task_is_never_made_up_for(pairs, which, better):
    """Failing one task (score 0) caps the aggregate at that task's relative score, below a tie
    with any baseline that learnt something, however well the other tasks go."""
    scores, baselines = [list(x) for x in zip(*pairs)]
    which %= len(scores)
    scores[which] = 0.0
    capped = aggregate(scores, baselines)
    assert capped <= relative(0.0, baselines[which])
    if baselines[which] > 0.01:
        assert capped < 0.5
    raised = [1.0 if i != which else 0.0 for i in range(len(scores))]  # every other task perfect
    assert aggregate(raised, baselines) == pytest.approx(relative(0.0, baselines[which]))
    assert aggregate([min(1.0, s + better) if i != which else 0.0
                      for i, s in enumerate(scores)], baselines) <= relative(0.0, baselines[which])


def test_relative_is_a_tie_at_the_baseline_and_orders_by_error():
    assert relative(0.9, 0.9) == 0.5 and relative(1.0, 1.0) == pytest.approx(0.5)
    assert relative(0.95, 0.9) > 0.5 > relative(0.85, 0.9)
    assert relative(0.0, 0.9) < 0.1 and relative(1.0, 0.9) > 0.98
    with pytest.raises(ValueError, match="one baseline per task"):
        aggregate([0.5], [0.5, 0.6])


def test_the_baseline_ties_with_itself_on_every_task(tmp_path):
    """A normalised two-task tier trains the baseline (Adam) at every scale of the grid; the
    baseline as a candidate scores exactly 0.5 on each task, and best.tasks lists both."""
    store = Store(tmp_path / "store.sqlite")
    executor = SerialExecutor()
    evaluator = Evaluator(modes.ALR, task_definition("diabetes"), 0, store, executor,
                          backend="numba")
    tiers = [Tier("multi", ("diabetes", "digits-mlp"), lr_scales=(0.5, 2.0), normalise=True)]
    fitness = FunnelFitness(evaluator, tiers, tmp_path / "funnel.jsonl")
    adam = modes.ALR.baseline()[1]
    sgd = "weight: mul(0.01, grad)"
    [a, s] = fitness.evaluate([adam, sgd])
    assert a.fitness == 0.5  # level 0, a tie at its own best scale, on both tasks
    assert s.fitness != 0.5
    # Every training counted (2 programs x 2 tasks x 2 scales; Adam is its own baseline), once.
    assert fitness.trainings == 8 and fitness.train_seconds > 0
    assert (a.source, s.source) == ("trained", "trained")
    again = fitness.evaluate([adam, sgd])
    assert fitness.trainings == 8
    assert [e.source for e in again] == ["store", "store"]  # met again: not trained again
    detail = fitness.best_detail(adam)
    assert [t["task"] for t in detail["tasks"]] == ["diabetes", "digits-mlp"]
    assert all(t["relative"] == 0.5 and t["score"] == t["baseline"] for t in detail["tasks"])
    assert detail["normalised"] and detail["lr_scale"] in (0.5, 2.0)
    rows = read_state(tmp_path / "funnel.jsonl").rows
    assert {key[1] for key in rows} == {"multi", "multi/diabetes", "multi/digits-mlp"}
    executor.close()
    store.close()


# -- DLR --------------------------------------------------------------------------------------------

def test_a_scaled_schedule_is_the_schedule_times_the_scale():
    decay = Schedule.parse("mul(lr, 0.5)")
    assert scaled_schedule(decay, 1.0) is decay
    scaled = scaled_schedule(decay, 10.0)
    assert scaled(0, 0.1) == pytest.approx(10 * decay(0, 0.01))
    with pytest.raises(ValueError, match="positive"):
        scaled_schedule(decay, 0.0)


def test_dlr_at_scale_ten_trains_as_a_ten_times_larger_constant_lr():
    task = task_definition("digits-mlp")
    small = modes.DLR.train(task, Schedule.parse("0.01"), seed=0, time_limit=None,
                            backend="numba", lr_scale=10.0)
    large = modes.DLR.train(task, Schedule.parse("0.1"), seed=0, time_limit=None,
                            backend="numba")
    assert small.fitness == large.fitness


# -- the command line --------------------------------------------------------------------------------

def test_bad_tiers_fail_before_the_run_directory_exists(env, tmp_path):  # noqa: F811
    cases = [("not json", "not on, off, a JSON list"),
             ('[{"name": "m", "tasks": ["quick"], "steps": 10}]', "not micro tasks"),
             ('[{"name": "q", "tasks": ["no-such-task"]}]', "no-such-task"),
             ('[{"name": "q", "tasks": ["quick"], "promote": 2}]', "promote is a fraction")]
    for text, message in cases:
        out = tmp_path / "run"
        result = engine_run(["--preset", "smoke", "--tiers", text, "--out", out, "--store",
                             tmp_path / "s.sqlite"], env, cwd=tmp_path, check=False)
        assert result.returncode == 2 and message in result.stderr, (text, result.stderr)
        assert "Traceback" not in result.stderr and not out.exists()
    result = engine_run(["--mode", "dlr", "--preset", "smoke", "--tiers",
                         '[{"name": "m", "tasks": ["fashion28-deep"], "steps": 10}]',
                         "--out", tmp_path / "d"], env, cwd=tmp_path, check=False)
    assert result.returncode == 2 and "DLR has no micro tier" in result.stderr


@pytest.mark.slow
def test_a_user_tiered_dlr_run_records_its_scale_and_tasks(env, tmp_path):  # noqa: F811
    """DLR through a trained, normalised two-task funnel from a --config file: summary.json's
    best.lr_scale and best.tasks, and the exported schedule at that scale."""
    tiers = [{"name": "quick", "tasks": ["digits-mlp", "diabetes"], "normalise": True,
              "lr_scales": [0.3, 3.0], "promote": 0.5}]
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"mode": "dlr", "preset": "smoke", "task": "digits-mlp",
                                  "executor": "serial", "tiers": tiers}))
    out = tmp_path / "run"
    engine_run(["--config", config, "--out", out, "--store", tmp_path / "s.sqlite"], env,
               cwd=tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    best = summary["best"]
    assert best["lr_scale"] in (0.3, 3.0)
    assert [t["task"] for t in best["tasks"]] == ["digits-mlp", "diabetes"]
    assert best["relative"] == min(t["relative"] for t in best["tasks"])
    assert summary["best_minus_baseline"] is None
    assert json.loads((out / "config.json").read_text())["tiers"][0]["normalise"] is True
    assert "--tiers" in summary["reproduce"]
    namespace: dict = {}
    exec((out / "best_optimizer.py").read_text(), namespace)
    assert namespace["LR_SCALE"] == best["lr_scale"]
    assert namespace["INITIAL_LR"] == pytest.approx(0.01 * best["lr_scale"])


def test_two_texts_of_one_program_are_scored_once(tmp_path):
    """The funnel keys candidates by their canonical program: a text that only spells the same
    program differently is answered from the first one's rows, not scored again."""
    store = Store(tmp_path / "store.sqlite")
    executor = SerialExecutor()
    evaluator = Evaluator(modes.ALR, "smoke", 0, store, executor, backend="numba")
    tiers = [Tier("micro", ("digits-mlp",), steps=20, promote=0.0)]
    fitness = FunnelFitness(evaluator, tiers, tmp_path / "funnel.jsonl")
    one, other = "weight: mul(0.01, grad)", "weight: mul(grad, 0.01)"
    assert fitness.key(one) == fitness.key(other)
    a, b = fitness.evaluate([one, other])
    assert a.fitness == b.fitness and (a.text, b.text) == (one, other)
    assert fitness.counts()[0]["evaluated"] == 1
    executor.close()
    store.close()


def test_the_funnel_log_appends_only_what_is_new_and_survives_a_cut_line(tmp_path):
    """Each save appends one line of new rows (never the whole state again); a last line a kill
    cut short is skipped on reading, and the next save starts a line of its own."""
    store = Store(tmp_path / "store.sqlite")
    executor = SerialExecutor()
    evaluator = Evaluator(modes.ALR, "smoke", 0, store, executor, backend="numba")
    tiers = [Tier("micro", ("digits-mlp",), steps=20, promote=0.0)]
    path = tmp_path / "funnel.jsonl"
    texts = ["weight: mul(0.01, grad)", "weight: mul(0.1, sign(grad))"]
    FunnelFitness(evaluator, tiers, path).evaluate(texts[:1])
    first = path.read_text()
    FunnelFitness(evaluator, tiers, path).evaluate(texts)  # resumed: one new row appended
    lines = path.read_text().splitlines()
    assert path.read_text().startswith(first)
    # Two saves an evaluate (the scorer's rows, then the call's counts): 2 rows in all, once each.
    assert [len(json.loads(line)["rows"]) for line in lines] == [1, 0, 1, 0]
    with open(path, "a") as handle:
        handle.write('{"rows": [["weight: grad", "micro", 1.0, 0, 0.5]], "ord')  # a kill
    state = read_state(path)
    assert len(state.rows) == 2 and list(state.order) == [FunnelFitness(
        evaluator, tiers, path).key(t) for t in texts]
    resumed = FunnelFitness(evaluator, tiers, path)
    resumed.evaluate(["weight: grad"])
    assert len(read_state(path).rows) == 3
    executor.close()
    store.close()
