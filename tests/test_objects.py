"""Objects, not text, through evaluation: a program is lowered once, its step counters are
stepped by one precomputed stepper, the report parses each phenotype once, and the run keeps
what evolve returned instead of reading its checkpoint back."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch

import kernels
from codegen import lower as lower_module
from codegen.ir import Program, UniformStepper
from engine import modes

# A step counter that reads lr (sigma), a tensor state (alpha), and a weight update that reads both.
COUNTING = ("alpha: mul(0.1, sub(alpha, grad))\nsigma: sub(-1.0, mul(lr, 0.5))\n"
            "weight: mul(lr, div(alpha, sub(1.0, pow(0.9, sigma))))")


@pytest.fixture
def lowerings(monkeypatch) -> list[str]:
    """Every call of codegen.lower.lower, wherever it was imported, counted and then made."""
    calls: list[str] = []
    real = lower_module.lower

    def counting(program, **options):
        calls.append(program.hash)
        return real(program, **options)

    for module in (lower_module, sys.modules["kernels.runtime"], sys.modules["kernels.optimizer"]):
        monkeypatch.setattr(module, "lower", counting)
    return calls


def _train(make, steps: int = 5) -> torch.Tensor:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = make(model.parameters())
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_an_optimizer_given_its_kernel_does_not_lower_the_program_again(lowerings):
    program = Program.parse(COUNTING)
    kernel = kernels.compile(program, "numba")
    assert len(lowerings) == 1
    got = _train(lambda p: kernels.EvolvedOptimizer(p, program, backend="numba", kernel=kernel))
    assert len(lowerings) == 1  # neither at construction nor at the first step
    want = _train(lambda p: kernels.EvolvedOptimizer(p, program, backend="numba"))
    assert len(lowerings) > 1 and torch.equal(got, want)


def test_a_kernel_for_another_program_is_refused():
    kernel = kernels.compile(Program.parse("weight: mul(0.1, grad)"), "numba")
    with pytest.raises(ValueError, match="kernel runs another program"):
        kernels.EvolvedOptimizer([torch.nn.Parameter(torch.ones(2))], COUNTING, kernel=kernel)
    with pytest.raises(TypeError, match="UpdateKernel"):
        kernels.EvolvedOptimizer([torch.nn.Parameter(torch.ones(2))], COUNTING, kernel="numba")


def test_the_evaluation_path_lowers_a_candidate_once(lowerings):
    """A worker's training (every trial of the protocol, each with its own optimizer) lowers the
    candidate once: where its kernel is compiled and timed."""
    from engine.tasks.protocol import get_task

    program = Program.parse(COUNTING)
    task = get_task("smoke")
    result = modes.ALR.train(task, program, seed=0, time_limit=300, backend="numba")
    assert result.reason is None and len(result.trials) >= 1
    assert lowerings == [program.hash]


# -- the one stepper of the uniform states -------------------------------------------------------

def test_the_stepper_is_built_once_and_its_chain_is_its_steps(monkeypatch):
    program = Program.parse(COUNTING)
    stepper = program.stepper()
    assert stepper.states == ("sigma",) and stepper.reads_lr
    found = []
    monkeypatch.setattr(Program, "uniform_states",
                        lambda self: found.append(1) or ())  # stepping must not ask again
    values, stepped = {}, []
    for _ in range(5):
        values = stepper.step(values, 0.25)
        stepped.append(values)
    assert stepper.chain({}, 0.25, 5) == stepped and found == []
    assert stepped[0] == {"sigma": float(np.float32(1.0) + np.float32(0.125))}


def test_every_user_of_step_counters_steps_them_with_the_programs_stepper(tmp_path):
    """The runtime, the optimizer's arena, the batched trainer, the interpreter and the export
    give the same step-counter values, the stepper's."""
    from engine.modes.export import render_alr
    from engine.tasks.batched import ArenaViews, KernelUpdate
    from kernels.interp import Batch

    program = Program.parse(COUNTING)
    stepper, lr = program.stepper(), 0.5
    want = stepper.chain({}, lr, 70)  # past one memo chain (64)

    kernel = kernels.compile(program, "numba")
    assert isinstance(kernel.stepper, UniformStepper)
    values = {}
    for expected in want[:3]:
        values = kernel.advance_scalars(values, lr)
        assert values == expected

    w = torch.nn.Parameter(torch.ones(3))
    opt = kernels.EvolvedOptimizer([w], program, lr=lr, backend="numba")
    update = KernelUpdate([program])
    arena = ArenaViews(np.ones((1, 16), np.float32), np.ones((1, 16), np.float32),
                       {"alpha": np.zeros((1, 16), np.float32)})
    batch = Batch([program], [0], [4], lr=lr)
    flat = [np.ones(4, np.float32) for _ in range(2)]
    for step, expected in enumerate(want):
        w.grad = torch.ones(3)
        opt.step()
        assert float(opt.state[w]["sigma"]) == expected["sigma"], step
        update(arena, np.array([lr]), step, np.array([True]))
        assert update.scalars[0] == expected, step
        batch.step(*flat, alpha=np.zeros(4, np.float32))
        assert float(batch.scalars[0, 2]) == expected["sigma"], step

    path = tmp_path / "best_counting.py"
    path.write_text(render_alr(program, "A test."))
    spec = importlib.util.spec_from_file_location("best_counting", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sigma = 0.0
    for expected in want[:3]:
        (sigma,) = module._advance(lr, sigma)
        assert sigma == expected["sigma"]


# -- the report and the run ----------------------------------------------------------------------

def test_the_report_parses_each_distinct_phenotype_once(tmp_path, monkeypatch):
    from engine.app.config import RunConfig
    from engine.app.report import RunOutputs, write_all
    from engine.evolution.evolve import EvolutionConfig, GenerationRecord

    texts = [f"weight: mul({0.01 * (i + 1):.2f}, grad)" for i in range(12)]
    history = []
    for g in range(4):  # every text in every generation, as elites and re-derivations repeat
        fitness = tuple(0.1 + 0.01 * i + 0.001 * g for i in range(len(texts)))
        history.append(GenerationRecord(g, tuple(texts), fitness, max(fitness),
                                        float(np.median(fitness)), min(fitness), texts[-1],
                                        len(texts)))
    config = RunConfig(name="run", out=tmp_path, mode="alr", preset="smoke", seed=0,
                       command="c", reproduce="r",
                       evolution=EvolutionConfig(population=12, generations=4, elitism=0,
                                                 tournament=2))
    parsed = []
    real = Program.parse.__func__
    monkeypatch.setattr(Program, "parse",
                        classmethod(lambda cls, text: parsed.append(text) or real(cls, text)))
    write_all(RunOutputs(run_dir=tmp_path, config=config, history=history, events=[],
                         status="finished"))
    # Each text once; best_optimizer.py renders the best from its text (one more).
    assert sorted(set(parsed)) == sorted(texts) and len(parsed) <= len(texts) + 1, len(parsed)


def test_a_finished_run_reports_what_evolve_returned_without_reading_its_checkpoint(
        tmp_path, monkeypatch):
    from engine.app import session
    from engine.rundir import CHECKPOINTS, newest_checkpoint

    reads = []
    real = session.newest_checkpoint
    monkeypatch.setattr(session, "newest_checkpoint",
                        lambda *args, **kw: reads.append(args) or real(*args, **kw))
    out = tmp_path / "run"
    code = session.main(["--mode", "dlr", "--preset", "smoke", "--executor", "serial",
                         "--generations", "2", "--population", "3", "--out", str(out),
                         "--store", str(tmp_path / "store.sqlite")])
    assert code == 0 and reads == []  # a fresh run that finished never reads a checkpoint
    summary = json.loads((out / "summary.json").read_text())
    body = newest_checkpoint(out / CHECKPOINTS).body
    assert summary["generations_done"] == len(body["history"]) == 2
    best = max(body["history"], key=lambda r: r["best"])
    assert summary["best"]["fitness"] == best["best"]
