"""`engine.compare --mode dlr`: a schedule against plain SGD at a tuned constant lr and a tuned
cosine schedule; every row torch.optim.SGD, the candidate's step factor as scaled_schedule.

Tiny budgets on scikit-learn's bundled data (digits, diabetes): seconds per comparison.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from codegen.ir import Schedule
from engine.compare import cli, schedules, tuning
from engine.compare.tuning import Settings
from engine.tasks import compare_tasks

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parent.parent
TINY = dataclasses.replace(compare_tasks.get_task("digits"), epochs=3)


def settings(task=TINY, **overrides) -> Settings:
    return Settings(**{"task": task, "seeds": 2, "trials": 3, **overrides})


def rows(text: str = "if(epoch < 2, 0.05, 0.01)", s: Settings | None = None):
    s = s or settings()
    return [schedules.candidate(Schedule.parse(text), "text", s), *schedules.baselines(s)]


def same_run(a, b) -> bool:
    (model_a, fit_a), (model_b, fit_b) = a, b
    return all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters())) \
        and dataclasses.replace(fit_a, seconds=0.0) == dataclasses.replace(fit_b, seconds=0.0)


# -- how each row trains -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["digits", "diabetes"])  # fit, and a SupervisedTask's fit
def test_a_constant_schedule_at_factor_s_is_sgd_constant_at_lr_times_s(name):
    task = dataclasses.replace(compare_tasks.get_task(name), epochs=3)
    s = settings(task)
    candidate, constant, _ = rows("0.01", s)
    assert schedules.initial_lr(task) == 0.01
    # The IR stores constants as float32: the schedule `0.01` says 0.009999999776482582.
    value = Schedule.parse("0.01")(0, 0.01)
    assert value == float(torch.tensor(0.01, dtype=torch.float32))
    for factor in (3.0, 0.37):
        run = tuning._train(s, candidate, factor, 1, 2)
        assert same_run(run, tuning._train(s, constant, value * factor, 1, 2))
        assert run[1].lr == (value * factor,) * 3 and run[1].reason is None
    # Not the same run for any lr: the factor moves it.
    assert not same_run(tuning._train(s, candidate, 3.0, 1, 2),
                        tuning._train(s, constant, value, 1, 2))


def test_the_candidates_factor_scales_every_lr_its_schedule_sets():
    """scaled_schedule's contract: the schedule sees lr / s and its lr is multiplied by s, SGD
    starting at s x the initial lr; so a decay `mul(lr, 0.5)` halves from s x 0.01."""
    candidate = rows("mul(lr, 0.5)")[0]
    _, fit = tuning._train(settings(), candidate, 4.0, 1, 2)
    assert fit.lr == pytest.approx([4.0 * 0.01 * 0.5 ** (k + 1) for k in range(3)], rel=1e-12)


def test_cosine_rows_learning_rates_are_cosine_annealing_per_epoch():
    task = dataclasses.replace(TINY, epochs=5)
    cosine = rows(s=settings(task))[2]
    _, fit = tuning._train(settings(task), cosine, 0.3, 1, 2)
    assert fit.lr == tuple(0.3 * 0.5 * (1 + math.cos(math.pi * k / 5)) for k in range(5))
    # What torch.optim.lr_scheduler.CosineAnnealingLR over the epoch budget gives, stepped once
    # an epoch (its recursive form: equal up to rounding).
    sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, T_max=5)
    torch_lrs = []
    for _ in range(5):
        torch_lrs.append(sgd.param_groups[0]["lr"])
        sgd.step()
        scheduler.step()
    assert fit.lr == pytest.approx(torch_lrs, rel=1e-12, abs=1e-15)
    assert "CosineAnnealingLR(T_max=5, eta_min=0)" in cosine.source
    with pytest.raises(ValueError, match="positive initial lr"):
        schedules.cosine(0.0, 5)


def test_every_row_is_plain_sgd():
    seen = []
    real = torch.optim.SGD

    class Spy(real):
        def __init__(self, params, **kwargs):
            seen.append(kwargs)
            super().__init__(params, **kwargs)

    for row in rows():
        make, _ = row.training(0.5, TINY)
        torch.optim.SGD = Spy
        try:
            optimizer = make(torch.nn.Linear(2, 2))
        finally:
            torch.optim.SGD = real
        group = optimizer.param_groups[0]
        assert (group["momentum"], group["weight_decay"], group["nesterov"]) == (0, 0, False)
    assert [k["lr"] for k in seen] == [0.5 * 0.01, 0.5, 0.5]  # the candidate: factor x initial


# -- the rows, the tasks, the sources ----------------------------------------------------------

def test_the_candidates_factor_spans_the_baselines_lr_range():
    s = settings(lr_range=(1e-4, 1.0))
    candidate, constant, cosine = rows(s=s)
    assert candidate.lr_range == pytest.approx((1e-2, 100.0))  # over the initial lr 0.01
    assert constant.lr_range is cosine.lr_range is None  # Settings.lr_range
    assert (candidate.tuned, constant.tuned, cosine.tuned) == \
        ("step factor", "learning rate", "learning rate")
    assert [r.name for r in rows(s=s)][1:] == [schedules.CONSTANT, schedules.COSINE]


def test_a_preset_trains_at_its_dlr_budget_a_family_at_its_own():
    from engine.tasks.protocol import PRESETS

    quick = schedules.dlr_task(compare_tasks.get_task("quick"))
    dlr = PRESETS["quick"].dlr
    assert (quick.epochs, quick.batch_size) == (dlr.max_epochs, dlr.batch_size)
    assert schedules.initial_lr(quick) == dlr.initial_lr
    digits = compare_tasks.get_task("digits")
    assert schedules.dlr_task(digits) is digits


def test_a_dlr_run_directory_and_a_file_are_accepted(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps(
        {"mode": "dlr", "best": {"program": "mul(lr, 0.9)", "lr_scale": 2.0}}))
    schedule, source = schedules.resolve_schedule(str(run))
    assert schedule == Schedule.parse("mul(lr, 0.9)")
    assert "summary.json" in source and "step factor 2 in the run" in source
    (run / "summary.json").write_text(json.dumps({"mode": "dlr",
                                                  "best": {"program": "0.05"}}))
    assert "step factor" not in schedules.resolve_schedule(str(run))[1]
    (tmp_path / "s.txt").write_text("# decay\nmul(lr, 0.9)\n")
    assert schedules.resolve_schedule(str(tmp_path / "s.txt")) == \
        (Schedule.parse("mul(lr, 0.9)"), str(tmp_path / "s.txt"))
    (run / "summary.json").write_text(json.dumps({"mode": "alr",
                                                  "best": {"program": "weight: grad"}}))
    with pytest.raises(cli.UsageError, match="the run's mode is 'alr', not 'dlr'; --mode dlr"):
        schedules.resolve_schedule(str(run))


# -- the comparison ----------------------------------------------------------------------------

def test_dlr_tuning_stays_in_range_and_never_reads_the_test_split(monkeypatch):
    s = settings(lr_range=(1e-3, 1e-2))  # the candidate's factors: [0.1, 1], a range apart

    def forbidden(task, seed):
        raise AssertionError("tuning read the test split")

    monkeypatch.setattr(compare_tasks, "load_test_split", forbidden)
    tuned = [tuning.tune(tuning.TuneJob(s, row)) for row in rows(s=s)]
    monkeypatch.undo()
    report = schedules.run_compare(rows(s=s), s)
    assert report["mode"] == "dlr" and report["initial_lr"] == 0.01
    assert report["rows"][0]["lr_range"] == pytest.approx([0.1, 1.0])
    assert [row["lr_range"] for row in report["rows"][1:]] == [[1e-3, 1e-2]] * 2
    for row, alone in zip(report["rows"], tuned):
        low, high = row["lr_range"]
        assert all(low <= t["lr"] <= high for t in row["tuning"]["trials"])
        assert {**row["tuning"], "seconds": 0} == {**alone, "seconds": 0}  # what tune saw
        assert len(row["tuning"]["trials"]) == 3 and len(row["seeds"]) == 2
    assert len({row["tuning"]["sampler_seed"] for row in report["rows"]}) == 3
    assert len(report["comparisons"]) == 2  # the candidate against each baseline


def test_cli_dlr_run_directory_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps(
        {"mode": "dlr", "best": {"program": "if(epoch < 1, 0.05, 0.01)", "lr_scale": 0.5}}))
    out = tmp_path / "out"
    assert cli.main(["--mode", "dlr", str(run), "--task", "digits", "--epochs", "2",
                     "--trials", "2", "--seeds", "2", "--workers", "1", "--out", str(out)]) == 0
    report = json.loads((out / "compare.json").read_text())
    assert report["mode"] == "dlr"
    assert [r["name"] for r in report["rows"]][1:] == ["SGD constant", "SGD cosine"]
    assert "step factor 0.5 in the run" in report["rows"][0]["source"]
    md = (out / "compare.md").read_text()
    assert "| SGD cosine |" in md and "every row is torch.optim.SGD" in md
    assert "`if(epoch < 1.0, 0.05, 0.01)`, by torch.optim.SGD from 0.01 x the tuned factor" in md
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "SGD constant" in capsys.readouterr().out


def test_cli_alr_records_its_mode(tmp_path):
    out = tmp_path / "out"
    assert cli.main(["weight: mul(0.05, grad)", "--task", "digits", "--epochs", "1", "--trials",
                     "2", "--seeds", "2", "--optimizers", "sign", "--workers", "1",
                     "--out", str(out)]) == 0
    assert json.loads((out / "compare.json").read_text())["mode"] == "alr"


@pytest.mark.parametrize("args, message", [
    (["mul(lr,"], "cannot parse the schedule from mul(lr,:"),
    (["weight: mul(0.1, grad)"], "cannot parse the schedule"),  # an ALR program
    (["mul(lr, 0.9)", "--optimizers", "adam"], "--mode dlr always compares with SGD constant"),
    (["{alrrun}"], "the run's mode is 'alr', not 'dlr'; --mode dlr compares schedules"),
    (["{rundir}"], "no summary.json there"),
])
def test_bad_dlr_inputs_are_one_line_and_exit_2(args, message, tmp_path, capsys):
    alr = tmp_path / "alr"
    alr.mkdir()
    (alr / "summary.json").write_text(json.dumps({"mode": "alr",
                                                  "best": {"program": "weight: grad"}}))
    (tmp_path / "empty").mkdir()
    args = [a.replace("{alrrun}", str(alr)).replace("{rundir}", str(tmp_path / "empty"))
            for a in args]
    assert cli.main(["--mode", "dlr", *args, "--task", "digits",
                     "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("engine.compare: error: ") and message in err
    assert not (tmp_path / "out").exists()


def test_a_bad_schedule_exits_2_from_the_module():
    bad = subprocess.run([sys.executable, "-m", "engine.compare", "--mode", "dlr",
                          "if(epoch < 2, 0.1)", "--task", "digits"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "cannot parse the schedule" in bad.stderr
