"""The run's outputs as units: hall of fame, counts, best_optimizer.py against the real thing.

No training here (seconds in all): the exported optimizer is checked against
kernels.EvolvedOptimizer on a tiny CNN and on random programs, and the exported schedule against
the IR's own evaluator. The end-to-end run that writes all of these is in test_run.py.
"""

from __future__ import annotations

import copy
import importlib.util
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kernels
from codegen.ir import Program, Schedule
from engine.fitness import outcomes
from engine.evolution.evolve import EvolutionConfig, GenerationRecord
from engine.modes.export import render_alr, render_dlr
from engine.evolution.grammar import ALR_GRAMMAR, DLR_GRAMMAR, load_grammar
from engine.app.report import evaluation_counts, hall_of_fame, reason_kind, wall_seconds
from engine.app.config import RunConfig
from engine import modes
from engine.evolution.seeds import snap
from engine.evolution.sge import initialise
from engine.tasks.training import ModelSpec
from randprog import random_program


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def record(generation, pairs):
    texts, fitness = zip(*pairs)
    return GenerationRecord(generation, tuple(texts), tuple(fitness), max(fitness),
                            float(np.median(fitness)), min(fitness), texts[fitness.index(max(fitness))],
                            len(texts))


# -- hall of fame and counts ---------------------------------------------------------------------

def test_hall_of_fame_is_distinct_by_hash_sorted_and_skips_the_floor():
    history = [
        record(0, [("weight: mul(0.5, grad)", 0.7), ("weight: mul(grad, 0.5)", 0.7),
                   ("weight: grad", 0.0), ("weight: mul(0.1, grad)", 0.8)]),
        record(1, [("weight: mul(0.1, grad)", 0.8), ("weight: mul(0.2, grad)", 0.7)]),
    ]
    fame = hall_of_fame("alr", history)
    assert [e["fitness"] for e in fame] == [0.8, 0.7, 0.7]
    assert len({e["hash"] for e in fame}) == 3  # mul(0.5, grad) and mul(grad, 0.5): one hash
    assert fame[1]["program"] == "weight: mul(0.5, grad)"  # the earliest of a tie
    assert fame[2]["generation"] == 1 and [e["rank"] for e in fame] == [1, 2, 3]
    assert hall_of_fame("alr", history, k=1)[0]["size"] == 3


# Every reason text AutoLR writes (one of each shape), and the kind it is counted under: the
# particulars (a step, an epoch, a limit, an exit code, an exception's message) go.
REASON_KINDS = {
    "screened: the weight update does not depend on grad":
        "screened: the weight update does not depend on grad",
    "screened: NaN or inf weight update on probe inputs at step 3":
        "screened: NaN or inf weight update",
    "screened: the weight never changes on probe inputs": "screened: the weight never changes",
    "diverged: training loss nan at epoch 0, step 3 (trial 0)": "diverged",
    "diverged: schedule gave lr=inf at epoch 2": "diverged",
    "timeout: deadline passed at epoch 1, step 7 (trial 1)": "timeout",
    "timeout: deadline passed after epoch 2": "timeout",
    "timeout after 30.0 s": "timeout",  # the executor's kill: the same kind as the deadline's
    "timeout after 4.5 s": "timeout",
    "worker died (exit code -9 / signal SIGKILL)": "worker died",
    "worker died (exit code 3)": "worker died",
    "worker died (exit code unknown)": "worker died",
    "raised: RuntimeError: Cannot set NUMBA_NUM_THREADS": "raised",
    "raised: MemoryError": "raised",
    "parse error: line 1, column 9: expected an expression": "parse error",
}


@pytest.mark.parametrize("reason, kind", REASON_KINDS.items())
def test_each_reason_is_counted_under_its_kind(reason, kind):
    assert reason_kind(reason) == kind


def test_failure_reasons_are_counted_by_kind():
    events = [{"event": "session", "time": 0.0},
              {"event": "evaluation", "source": "trained", "reason": None, "seconds": 2, "time": 5},
              {"event": "evaluation", "source": "screened", "reason": "screened: x", "time": 6},
              {"event": "session", "time": 100.0},
              {"event": "evaluation", "source": "store", "reason": None, "time": 103.0}]
    counts = evaluation_counts(events)
    assert counts["requested"] == 3 and counts["outcomes"]["trained"] == 1
    assert counts["outcomes"]["store"] == 1 and counts["outcomes"]["screened"] == 1
    assert counts["reasons"] == {"screened: x": 1} and counts["train_seconds"] == 2
    assert wall_seconds(events) == (9.0, 2)  # 6 s, then 3 s: a killed session ends at its last event


def test_every_answer_has_exactly_one_outcome_kind():
    """A failure is counted by what went wrong, however it was learnt (trained now, from the
    store, as a fingerprint twin); successes by how their fitness was obtained."""
    cases = [("trained", None, "trained"), ("store", None, "store"), ("fingerprint", None, "twin"),
             ("screened", "screened: the weight never changes on probe inputs", "screened"),
             ("store", "screened: NaN or inf weight update on probe inputs at step 1",
              "screened"),
             ("trained", "diverged: training loss nan at epoch 0, step 5 (trial 0)", "diverged"),
             ("store", "diverged: schedule gave lr=inf at epoch 2", "diverged"),
             ("fingerprint", "diverged: validation loss inf at epoch 1", "diverged"),
             ("trained", "timeout: deadline passed at epoch 3, step 7", "timeout"),
             ("trained", "timeout after 30.0 s", "timeout"),
             ("trained", "raised: ValueError: boom", "error"),
             ("trained", "worker died (exit code -9 / signal SIGKILL)", "error"),
             ("failed", "parse error: unexpected character ';' at 1:5", "unparseable")]
    for source, reason, kind in cases:
        assert outcomes.kind_of(source, reason) == kind, (source, reason)
    answers = [{"source": s, "reason": r} for s, r, _ in cases]
    counts = outcomes.count(answers)
    assert list(counts) == [k.name for k in outcomes.KINDS] and sum(counts.values()) == len(cases)
    assert counts["diverged"] == 3 and counts["error"] == 2
    assert outcomes.describe(counts) == ("trained 1 · store 1 · twin 1 · screened 2 · diverged 3 "
                                         "· timeout 2 · error 2 · unparseable 1")
    assert outcomes.describe(outcomes.zero()) == "none yet"


def test_behavioural_twins_are_one_entry_of_the_hall_of_fame():
    """`square(grad)` and `mul(grad, grad)`: two canonical forms, one behaviour."""
    history = [record(0, [("weight: square(grad)", 0.5), ("weight: mul(0.1, grad)", 0.6)]),
               record(1, [("weight: mul(grad, grad)", 0.5), ("weight: mul(0.2, grad)", 0.4)])]
    twin = Program.parse("weight: mul(grad, grad)")
    assert twin.hash != Program.parse("weight: square(grad)").hash  # distinct by hash alone
    fame = hall_of_fame("alr", history)
    assert [e["program"] for e in fame] == ["weight: mul(0.1, grad)", "weight: square(grad)",
                                            "weight: mul(0.2, grad)"]
    assert fame[1]["twins"] == [twin.hash] and fame[0]["twins"] == []
    # DLR: epochs are whole numbers, so these two schedules give the same learning rates.
    history = [record(0, [("if(epoch < 3, 0.1, 0.01)", 0.7), ("if(epoch < 2.5, 0.1, 0.01)", 0.7),
                          ("if(epoch < 2, 0.1, 0.01)", 0.6)])]
    fame = hall_of_fame("dlr", history, preset="smoke")
    assert [e["program"] for e in fame] == ["if(epoch < 3, 0.1, 0.01)",
                                            "if(epoch < 2, 0.1, 0.01)"]
    assert fame[0]["twins"] == [Schedule.parse("if(epoch < 2.5, 0.1, 0.01)").hash]


def test_the_curves_plot_names_the_split_of_each_line():
    """The curves are validation-split accuracy per epoch; the fitness is fitness-split
    accuracy (min over trials): the plot draws both and says which is which."""
    import matplotlib.pyplot as plt

    from engine.app import plots, report

    config = RunConfig(name="t", out=Path("t"), mode="alr", preset="smoke", seed=0,
                       evolution=EvolutionConfig(population=1, elitism=0, tournament=1))
    outcome = report.RunOutputs(
        run_dir=None, config=config, history=[], events=[], status="finished",
        baseline={"name": "Adam", "hash": "b" * 20, "fitness": 0.385},
        curves={"a" * 20: {"val_acc": [[0.40, 0.55, 0.565], [0.46, 0.515, 0.56]]},
                "b" * 20: {"val_acc": [[0.27, 0.29, 0.37]]}})
    fig = plots.curves_figure(outcome, "a" * 20, 0.63)
    ax = fig.axes[0]
    assert "validation split" in ax.get_ylabel() and "fitness split" in ax.get_ylabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "best, trial 0: validation split" in labels
    assert "best: fitness 0.6300 (min over trials, fitness split)" in labels
    assert "Adam: fitness 0.3850 (min over trials, fitness split)" in labels
    levels = sorted(line.get_ydata()[0] for line in ax.get_lines() if line.get_linestyle() == ":")
    assert levels == [0.385, 0.63]
    plt.close(fig)


# -- best_optimizer.py (ALR) ----------------------------------------------------------------------

def grammar_programs(n):
    grammar = load_grammar(ALR_GRAMMAR)
    rng = random.Random(7)
    found = []
    while len(found) < n:
        program = Program.parse(initialise(grammar, rng, 4, 10).phenotype)
        if program.reads_grad_in_weight():
            found.append(program)
    return found


def train(model_seed, make_optimizer, steps=4):
    torch.manual_seed(0)
    model = ModelSpec(conv1=3, conv2=4, dense=8).build(model_seed)  # channels_last convs
    optimizer = make_optimizer(model.parameters())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_exported_optimizer_matches_evolved_optimizer(tmp_path):
    alr = load_grammar(ALR_GRAMMAR)
    programs = [Program.parse(snap(s, alr, modes.ALR, 17)) for s in modes.ALR.zoo_seeds()]
    programs += grammar_programs(1)
    for i, program in enumerate(programs):
        path = tmp_path / f"best_{i}.py"
        path.write_text(render_alr(program, "A test."))
        module = load_module(path, f"best_{i}")
        assert Program.parse(module.PROGRAM).hash == program.hash
        want = train(i, lambda p: kernels.EvolvedOptimizer(p, program, backend="numba"))
        for backend in ("auto", "torch"):
            got = train(i, lambda p: module.BestOptimizer(p, backend=backend))
            assert torch.allclose(got, want, rtol=0, atol=1e-6, equal_nan=True), (backend, program)
        got = train(i, lambda p: module.BestOptimizer(p))
        assert torch.equal(got.nan_to_num(), want.nan_to_num()), "numba path: same kernel, same bits"


def test_exported_optimizer_covers_every_op_and_lr(tmp_path):
    """Random programs over every IR op (extended ones too), at lr != 1, on flat parameters."""
    rng = random.Random(3)
    for i in range(4):
        program = random_program(rng, max_depth=4)
        path = tmp_path / f"rand_{i}.py"
        path.write_text(render_alr(program, "A test."))
        module = load_module(path, f"rand_{i}")
        weights = torch.randn(64, generator=torch.Generator().manual_seed(i))
        results = []
        for make in (lambda p: kernels.EvolvedOptimizer(p, program, backend="torch", lr=0.3),
                     lambda p: module.BestOptimizer(p, lr=0.3, backend="torch"),
                     lambda p: module.BestOptimizer(p, lr=0.3, backend="numba")):
            w = torch.nn.Parameter(weights.clone())
            opt = make([w])
            for step in range(3):
                w.grad = torch.sin(w.detach() * (step + 1))
                opt.step()
            results.append(w.detach())
        for other in results[1:]:
            assert torch.allclose(other, results[0], rtol=1e-5, atol=1e-6, equal_nan=True), program


def test_exported_optimizer_saves_and_loads_its_state(tmp_path):
    program = Program.parse(snap(modes.ALR.zoo_seeds()[0], load_grammar(ALR_GRAMMAR), modes.ALR, 17))
    path = tmp_path / "best_state.py"
    path.write_text(render_alr(program, "A test."))
    module = load_module(path, "best_state")
    w = torch.nn.Parameter(torch.ones(5))
    opt = module.BestOptimizer([w])
    w.grad = torch.full((5,), 0.5)
    opt.step()
    state = copy.deepcopy(opt.state_dict())  # torch's state_dict shares the live tensors
    assert set(state["state"][0]) == {"alpha", "beta", "sigma"} and float(state["state"][0]["sigma"]) == 1.0
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = module.BestOptimizer([w2])
    opt2.load_state_dict(state)
    for o, p in ((opt, w), (opt2, w2)):
        p.grad = torch.full((5,), -0.25)
        o.step()
    assert torch.equal(w, w2)
    with pytest.raises(ValueError, match="backend"):
        module.BestOptimizer([w], backend="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_exported_optimizer_takes_lr_weight_decay_and_maximize_as_evolved_optimizer(tmp_path,
                                                                                    dtype):
    """The same options with the same meaning: lr scales a program that never reads it (under a
    scheduler), decoupled weight decay, maximize; float64 math and float32 states for bfloat16."""
    for i, program in enumerate([Program.parse("alpha: mul(0.5, sub(alpha, grad))\n"
                                               "weight: mul(0.1, alpha)"), kernels.zoo.adam()]):
        path = tmp_path / f"options_{i}.py"
        path.write_text(render_alr(program, "A test."))
        module = load_module(path, f"options_{i}_{str(dtype)[6:]}")
        assert module.DEFAULT_LR == 1.0
        results = []
        # The file runs numba's loop on CPU float32 parameters and torch ops on the others.
        backend = "numba" if dtype == torch.float32 else "torch"
        for make in (lambda p: kernels.EvolvedOptimizer(p, program, 1e-2, weight_decay=0.3,
                                                        maximize=True, backend=backend),
                     lambda p: module.BestOptimizer(p, lr=1e-2, weight_decay=0.3, maximize=True)):
            w = torch.nn.Parameter(torch.linspace(-1, 1, 64, dtype=dtype))
            opt = make([w])
            scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
            for step in range(6):
                w.grad = torch.sin(w.detach() * (step + 1))
                opt.step()
                scheduler.step()
            results.append(w.detach())
        assert torch.equal(results[0], results[1]), program
    with pytest.raises(ValueError, match="weight_decay"):
        module.BestOptimizer([w], weight_decay=-1.0)


# -- best_optimizer.py (DLR) ----------------------------------------------------------------------

def test_exported_schedule_is_the_evolved_schedule(tmp_path):
    grammar = load_grammar(DLR_GRAMMAR)
    rng = random.Random(5)
    texts = ["if(lr <= 0.0011090909, 0.0011090909, if(epoch < 3, 0.1, 0.0011090909))"]
    texts += [initialise(grammar, rng, 3, 7).phenotype for _ in range(20)]
    for i, text in enumerate(texts):
        schedule = Schedule.parse(text)
        path = tmp_path / f"sched_{i}.py"
        path.write_text(render_dlr(schedule, "A test."))
        module = load_module(path, f"sched_{i}")
        for epoch in range(0, 12):
            for lr in (0.0001, 0.0011090909, float(np.float32(0.0011090909)), 0.01, 0.05, 0.1):
                assert module.schedule(epoch, lr) == schedule(epoch, lr), (text, epoch, lr)
        # The scheduler drives SGD as the DLR protocol does: lr_e = f(e, lr_{e-1}), from 0.01.
        w = torch.nn.Parameter(torch.zeros(1))
        sgd = torch.optim.SGD([w], lr=module.INITIAL_LR)
        scheduler = module.BestSchedule(sgd)
        expected, lr = [], 0.01
        seen = []
        for epoch in range(6):
            lr = schedule(epoch, lr)
            expected.append(lr)
            seen.append(sgd.param_groups[0]["lr"])
            sgd.step()
            scheduler.step()
        assert seen == expected, text


# -- text from the user in generated files ----------------------------------------------------

ODD_NAME = 'run\\Nx "it\'s" \\u00e9-ü ```'  # a backslash escape, quotes, unicode, a fence


@pytest.mark.parametrize("mode", ["alr", "dlr"])
def test_outputs_of_a_run_with_an_odd_name_import_and_quote_it_verbatim(tmp_path, mode):
    """A run directory named `run\\Nx` once made a best_optimizer.py that did not import
    (SyntaxError: unicode error): its name was pasted between quotes."""
    from engine.app.report import RunOutputs, write_all

    text = modes.get(mode).zoo_seeds()[0]
    text = snap(text, load_grammar(ALR_GRAMMAR if mode == "alr" else DLR_GRAMMAR), modes.get(mode), 17)
    run_dir = tmp_path / ODD_NAME
    run_dir.mkdir()
    reproduce = f"python -m engine.run --grammar '{tmp_path}/g ```x.bnf'"
    config = RunConfig(name=run_dir.name, out=run_dir, mode=mode, preset="smoke", seed=3,
                       command=reproduce, reproduce=reproduce,
                       evolution=EvolutionConfig(population=1, generations=1, elitism=0,
                                                 tournament=1))
    history = [record(0, [(text, 0.5)])]
    write_all(RunOutputs(run_dir=run_dir, config=config, history=history, events=[],
                      status="finished"))
    module = load_module(run_dir / "best_optimizer.py", f"odd_{mode}")
    assert f"Run {ODD_NAME} (mode {mode}" in module.__doc__
    parsed = (Program if mode == "alr" else Schedule).parse(
        module.PROGRAM if mode == "alr" else module.SCHEDULE)
    assert parsed.hash == (Program if mode == "alr" else Schedule).parse(text).hash
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    assert f"````\n{reproduce}\n````" in report  # the fence outlasts the ``` in the path
