"""`engine.compare`: fair tuning, no test data while tuning, reproducible tables, divergence shown.

Everything here trains on scikit-learn's bundled digits data (no download, no Fashion-MNIST
needed) with a 2-epoch budget and a handful of trials, so each comparison takes about a second.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from codegen.ir import Program
from engine.compare import cli, cost, stats, tables, tuning
from engine.tasks import compare_tasks
from engine.compare.tuning import Settings, baseline_contender, candidate, run_compare
from kernels import zoo

ROOT = Path(__file__).resolve().parent.parent
TINY = dataclasses.replace(compare_tasks.get_task("digits"), epochs=2)
NAN_PROGRAM = "weight: sqrt(neg(square(grad)))"  # NaN for every nonzero gradient
# NaN exactly where lr * |grad| > 1: diverges at large step factors only.
EDGY_PROGRAM = "weight: mul(lr, div(grad, sqrt(sub(1.0, square(mul(lr, grad))))))"


def settings(**overrides) -> Settings:
    return Settings(**{"task": TINY, "seeds": 2, "trials": 4, **overrides})


def contenders(text: str = "weight: mul(0.05, grad)", *keys: str):
    return [candidate(Program.parse(text)), *(baseline_contender(k) for k in keys or ("adam", "sign"))]


TIMES = ("seconds", "step_seconds", "step_vs_adam")


def without_times(value):
    """The report minus wall-clock fields, which are the only thing allowed to change."""
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if k not in TIMES}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


# -- who competes, and how -------------------------------------------------------------------

def test_evolved_programs_run_as_they_are_their_lr_a_step_factor():
    """No private wrapping: the candidate runs its own text, and EvolvedOptimizer's `lr` (the
    tuned value) scales the weight update of a program that never reads it."""
    program = Program.parse("alpha: mul(0.1, sub(alpha, grad))\nweight: mul(0.01, alpha)")
    assert candidate(program).program == str(program)
    assert candidate(program).tuned == "step factor"
    assert baseline_contender("adam").tuned == baseline_contender("adamw").tuned == "learning rate"
    assert baseline_contender("ades").tuned == baseline_contender("sign").tuned == "step factor"


def test_lion_is_a_default_row_next_to_adam_and_adagrad_adabelief_are_on_request():
    from engine.compare.cli import build_parser, contenders_from
    from engine.compare.tuning import BASELINES

    assert BASELINES[:3] == ("adam", "adamw", "lion")
    assert "adagrad" not in BASELINES and "adabelief" not in BASELINES
    args = build_parser().parse_args(["weight: mul(0.1, grad)",
                                      "--optimizers", "lion,adagrad,adabelief"])
    rows = contenders_from(args)[1:]
    assert [r.name for r in rows] == ["Lion", "Adagrad", "AdaBelief"]
    for row, key in zip(rows, ("lion", "adagrad", "adabelief")):
        assert row.tuned == "learning rate" and row.program == str(zoo.ZOO[key]())


def test_adamw_is_adam_with_decoupled_weight_decay():
    adamw, adam = baseline_contender("adamw"), baseline_contender("adam")
    assert adamw.name == "AdamW" and adamw.program == adam.program == str(zoo.adam())
    assert (adamw.tune_decay, adam.tune_decay, baseline_contender("lion").tune_decay) == \
        (True, False, True)
    assert "decoupled weight decay (tuned with lr" in adamw.source
    # Same lr, same seeds: the training differs by the weight decay alone, and it is applied.
    s = settings()
    with_decay, _ = tuning._train(s, adamw, 1e-2, 1, 2, weight_decay=0.05)
    without, _ = tuning._train(s, adamw, 1e-2, 1, 2)
    assert any(not torch.equal(p, q) for p, q in zip(with_decay.parameters(),
                                                     without.parameters()))


def test_adamw_and_lion_tune_weight_decay_in_the_same_trials():
    """Their TPE study samples lr and weight decay (log-uniform, --wd-range) within everyone's
    trial budget; the chosen decay is reported, edge-flagged, and used by every seed. No other
    row has one."""
    wd_range = (1e-4, 5e-2)
    rows = contenders("weight: mul(0.05, grad)", "adam", "adamw", "lion")
    report = run_compare(rows, settings(trials=5, seeds=1, wd_range=wd_range))
    by = {row["name"]: row for row in report["rows"]}
    for name in ("AdamW", "Lion"):
        row, trials = by[name], by[name]["tuning"]["trials"]
        assert len(trials) == 5 and len({t["weight_decay"] for t in trials}) == 5
        assert all(wd_range[0] <= t["weight_decay"] <= wd_range[1] for t in trials)
        assert wd_range[0] <= row["weight_decay"] <= wd_range[1] and row["weight_decay"] != 0.01
        best = max(trials, key=lambda t: t["val_acc"])
        assert (row["lr"], row["weight_decay"]) == (best["lr"], best["weight_decay"])
        assert set(row["tuning"]["edge"]) == {"lr", "weight decay"}
    for name in ("Adam", rows[0].name):
        assert by[name]["weight_decay"] is None
        assert "weight_decay" not in by[name]["tuning"]["trials"][0]
    assert report["wd_range"] == list(wd_range)
    cells = {r[0]: r[1] for r in tables.table_rows(report)}
    assert f"wd {by['AdamW']['weight_decay']:.3g}" in cells["AdamW"] and "wd" not in cells["Adam"]
    # The seeds train with the tuned decay: seed 0 rerun with it reproduces the row's curve.
    adamw, s = next(c for c in rows if c.name == "AdamW"), settings(trials=5, seeds=1)
    job = tuning.SeedJob(s, adamw, by["AdamW"]["lr"], 0, by["AdamW"]["weight_decay"])
    assert tuning.train_seed(job)["val_curve"] == by["AdamW"]["seeds"][0]["val_curve"]
    # A tuned decay at the end of its range is flagged like an lr.
    by["AdamW"]["weight_decay"] = 4.9e-2
    by["AdamW"]["tuning"]["edge"] = {"lr": None, "weight decay": "high"}
    assert "(weight decay high edge)" in {r[0]: r[1] for r in tables.table_rows(report)}["AdamW"]
    assert "also their decoupled weight decay" in tables.markdown(report)


def test_program_from_text_file_and_run_directory(tmp_path):
    text = "weight: mul(0.001, sign(grad))"
    assert tuning.resolve_program(text)[0] == Program.parse(text)
    (tmp_path / "p.txt").write_text(text + "\n")
    assert tuning.resolve_program(str(tmp_path / "p.txt"))[0] == Program.parse(text)
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"run": "r", "mode": "alr",
                                                  "best": {"program": text}}))
    program, source = tuning.resolve_program(str(run))
    assert program == Program.parse(text) and "summary.json" in source
    (run / "summary.json").write_text(json.dumps({"mode": "dlr", "best": {"program": "0.01"}}))
    with pytest.raises(cli.UsageError, match="DLR"):
        tuning.resolve_program(str(run))


def test_tasks_have_disjoint_fixed_splits():
    task = compare_tasks.get_task("digits")
    a = compare_tasks.train_val(task, 0)
    for cached in (compare_tasks.train_val, compare_tasks.load_test_split, compare_tasks.digits_indices):
        cached.cache_clear()  # the same split again, computed afresh: not the cached object
    b = compare_tasks.train_val(task, 0)
    assert a is not b
    assert all(torch.equal(x, y) for x, y in zip((*a.train, *a.val), (*b.train, *b.val)))
    x_test, _ = compare_tasks.load_test_split(task, 0)
    rows = {tuple(r.tolist()) for r in a.train[0]}
    assert not rows & {tuple(r.tolist()) for r in x_test}  # digits has few exact duplicates
    assert len(a.train[1]) == 997 and len(a.val[1]) == 350 and len(x_test) == 450
    assert not torch.equal(compare_tasks.train_val(task, 1).train[0], a.train[0])
    with pytest.raises(ValueError, match="unknown task 'nope'; choose one of: smoke, quick"):
        compare_tasks.get_task("nope")


def test_compare_tasks_come_from_the_registry():
    """One task table: compare defines no task of its own; its names are the registry's (the
    fmnist-cnn preset sizes, the families, the `digits` alias), with the families' settings."""
    from engine.tasks import registry
    from engine.tasks.families import digits_mlp, fmnist_cnn, fmnist_mlp

    assert not hasattr(compare_tasks, "TASKS")
    assert set(compare_tasks.names()) == ({*fmnist_cnn.SIZES, *registry.FAMILIES, *registry.ALIASES}
                                          - {"fmnist-cnn"})
    for name, family in (("digits", digits_mlp), ("digits-mlp", digits_mlp),
                         ("fmnist-mlp", fmnist_mlp)):
        task, own = compare_tasks.get_task(name), family.task()
        assert (task.batch_size, task.epochs, task.held_out) == (own.batch_size, own.epochs, True)
        assert (task.model.inputs, *task.model.hidden, task.model.classes) == family.WIDTHS
        assert (task.source, task.sizes) == (family.HELD_OUT["source"], family.HELD_OUT["sizes"])
    for name, preset in fmnist_cnn.SIZES.items():
        task = compare_tasks.get_task(name)
        assert (task.model, task.batch_size, task.epochs) == \
            (preset.model, preset.alr.batch_size, preset.alr.max_epochs)
    assert registry.resolve("digits")[1].name == "digits-mlp"  # engine.run takes the alias too


# -- the guarantees ----------------------------------------------------------------------------

def test_tuning_never_reads_the_test_split(monkeypatch):
    """A spy records every test-data read; tuning runs first and reads none. Then the test split
    is poisoned (labels rotated): the tuning and the chosen values stay identical to the bit,
    only the test accuracies move. Tuning could not have looked."""
    events = []
    real_tune, real_test = tuning.tune, compare_tasks.load_test_split

    def spy_tune(job):
        events.append("tune")
        return real_tune(job)

    def spy_test(task, seed):
        events.append("test")
        return real_test(task, seed)

    monkeypatch.setattr(tuning, "tune", spy_tune)
    monkeypatch.setattr(compare_tasks, "load_test_split", spy_test)
    clean = run_compare(contenders(), settings())
    assert events.count("tune") == 3 and "test" in events
    assert "test" not in events[: max(i for i, e in enumerate(events) if e == "tune") + 1]

    def poisoned(task, seed):
        x, y = real_test(task, seed)
        return x, (y + 1) % 10

    monkeypatch.setattr(compare_tasks, "load_test_split", poisoned)
    bad = run_compare(contenders(), settings())
    for a, b in zip(clean["rows"], bad["rows"]):
        assert without_times(a["tuning"]) == without_times(b["tuning"])
        assert a["lr"] == b["lr"]
        assert [s["best_val"] for s in a["seeds"]] == [s["best_val"] for s in b["seeds"]]
    assert [r["test"]["mean"] for r in clean["rows"]] != [r["test"]["mean"] for r in bad["rows"]]

    def forbidden(task, seed):
        raise AssertionError("tuning read the test split")

    monkeypatch.setattr(compare_tasks, "load_test_split", forbidden)
    for contender in contenders():
        tuning.tune(tuning.TuneJob(settings(), contender))  # never calls it


@pytest.mark.parametrize("name", ["wine-mlp", "cancer-mlp", "digits-cnn"])
def test_held_out_families_are_tuned_without_their_test_split(name, monkeypatch):
    """The held-out families hold their test split in the same loaded data as train and val;
    tuning still never asks for it, and each final seed asks once."""
    task = dataclasses.replace(compare_tasks.get_task(name), epochs=2)
    real_test, reads = compare_tasks.load_test_split, []

    def forbidden(task, seed):
        raise AssertionError("tuning read the test split")

    monkeypatch.setattr(compare_tasks, "load_test_split", forbidden)
    for contender in contenders("weight: mul(0.05, grad)", "adamw"):
        tuning.tune(tuning.TuneJob(settings(task=task, trials=2), contender))

    def counted(task, seed):
        reads.append(seed)
        return real_test(task, seed)

    monkeypatch.setattr(compare_tasks, "load_test_split", counted)
    report = run_compare(contenders("weight: mul(0.05, grad)", "adamw"),
                         settings(task=task, trials=2, seeds=2))
    assert len(reads) == 4 and all(s["reason"] is None for r in report["rows"] for s in r["seeds"])
    assert report["costs"]["AdamW"]["bytes_per_param"] == 8


def test_test_split_raises_during_tuning_and_is_read_once_per_seed_after(monkeypatch):
    """The test-split loader raises whenever a tuning job is running (and records it, in case
    the raise were swallowed); after tuning, each seed's final scoring reads it exactly once."""
    real_tune, real_test = tuning.tune, compare_tasks.load_test_split
    state = {"tuning": False, "during": 0, "after": 0}

    def tune(job):
        state["tuning"] = True
        try:
            return real_tune(job)
        finally:
            state["tuning"] = False

    def load_test_split(task, seed):
        if state["tuning"]:
            state["during"] += 1
            raise AssertionError("the test split was read while tuning")
        state["after"] += 1
        return real_test(task, seed)

    monkeypatch.setattr(tuning, "tune", tune)
    monkeypatch.setattr(compare_tasks, "load_test_split", load_test_split)
    report = run_compare(contenders(), settings(seeds=3))
    assert state["during"] == 0 and all(row["failed"] is None for row in report["rows"])
    assert all(s["reason"] is None for row in report["rows"] for s in row["seeds"])
    assert state["after"] == 3 * len(report["rows"])  # once per seed, for the final score only


def test_same_seed_same_table_other_seed_other_table():
    first = run_compare(contenders(), settings())
    again = run_compare(contenders(), settings())
    assert tables.table_rows(first) == tables.table_rows(again)
    assert without_times(first) == without_times(again)
    other = run_compare(contenders(), settings(seed=1))
    assert tables.table_rows(other) != tables.table_rows(first)


def test_every_optimizer_gets_the_same_budget_and_its_own_stable_sampler_seed():
    report = run_compare(contenders(), settings(trials=5))
    names = [row["name"] for row in report["rows"]]
    seeds = [row["tuning"]["sampler_seed"] for row in report["rows"]]
    assert all(len(row["tuning"]["trials"]) == 5 for row in report["rows"])
    assert all(tuning.LR_RANGE[0] <= t["lr"] <= tuning.LR_RANGE[1]
               for row in report["rows"] for t in row["tuning"]["trials"])
    assert len(set(seeds)) == 3 and report["sampler"]["seeds"] == dict(zip(names, seeds))
    firsts = [row["tuning"]["trials"][0]["lr"] for row in report["rows"]]
    assert len(set(firsts)) == 3  # no two rows start from the same trial
    assert seeds == [tuning.sampler_seed(settings(), n) for n in names]
    assert tuning.sampler_seed(settings(seed=1), "Adam") != seeds[names.index("Adam")]
    # Stable across processes (a salted hash() of the name would not be):
    code = "from engine.compare.tuning import *; import sys; print(sampler_seed(Settings(None), 'Adam'))"
    other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": "123"}, timeout=120)
    assert other.returncode == 0, other.stderr
    assert int(other.stdout) == tuning.sampler_seed(settings(), "Adam")


def test_a_tuned_value_at_the_edge_of_its_range_is_marked(tmp_path):
    report = run_compare(contenders(), settings(lr_range=(1e-4, 1e-1)))
    for row in report["rows"]:
        assert row["tuning"]["edge"] == {"lr": stats.at_edge(row["lr"], 1e-4, 1e-1)}
    # Where tuning lands is the sampler's business; the marking is tested on chosen values.
    for row, lr in zip(report["rows"], (1.1e-4, 0.095, 3e-3)):
        row["lr"] = row["tuning"]["lr"] = lr
        row["tuning"]["edge"] = {"lr": stats.at_edge(lr, 1e-4, 1e-1)}
    assert [r[1] for r in tables.table_rows(report)] == [
        "x0.00011 (low edge)", "lr 0.095 (high edge)", "x0.003"]
    md = tables.write_outputs(report, tmp_path)["markdown"].read_text()
    assert "| lr 0.095 (high edge) |" in md and "within 5% of the log-range" in md


def test_a_diverging_program_is_reported_not_hidden(tmp_path):
    report = run_compare([candidate(Program.parse(NAN_PROGRAM)), baseline_contender("sign")], settings())
    row = report["rows"][0]
    assert row["tuning"]["diverged"] == 4
    assert row["test"]["diverged"] == 2 and row["test"]["mean"] == 0.0  # counted at the floor
    cells = tables.table_rows(report)[0]
    assert cells[3] == "4/4" and cells[5] == "2/2" and cells[4].startswith("0.00 ±")
    paths = tables.write_outputs(report, tmp_path)
    md = paths["markdown"].read_text()
    assert "| 4/4 |" in md and "| 2/2 |" in md and "diverged: training loss nan" in md
    assert "| 0/0/2 |" in md  # both seeds lost against Sign: diverged seeds count, at 0
    assert "With 2 seeds and 1 comparison the smallest Holm-corrected p is 0.5" in md


def test_divergence_at_some_tuned_settings_is_counted():
    report = run_compare([candidate(Program.parse(EDGY_PROGRAM))],
                         settings(trials=5, lr_range=(1e-2, 1e3)))
    tuning = report["rows"][0]["tuning"]
    assert 0 < tuning["diverged"] < 5
    assert all(t["val_acc"] == 0.0 for t in tuning["trials"] if t["reason"])
    assert report["rows"][0]["test"]["diverged"] == 0  # the chosen factor is a finite one


def test_a_crashing_optimizer_is_a_failed_row_not_a_crash(monkeypatch):
    real_tune = tuning.tune

    real_measure = cost.measure

    def tune(job):
        if job.contender.role == "candidate":
            raise RuntimeError("kernel exploded")
        return real_tune(job)

    def measure(task, program, *args):
        if program == contenders()[0].program:
            raise RuntimeError("kernel exploded")
        return real_measure(task, program, *args)

    monkeypatch.setattr(tuning, "tune", tune)
    monkeypatch.setattr(cost, "measure", measure)
    report = run_compare(contenders(), settings())
    row = report["rows"][0]
    assert row["failed"] == "tuning failed: raised: RuntimeError: kernel exploded"
    assert row["test"] == {"mean": 0.0, "sd": 0.0, "median": 0.0, "n": 2, "diverged": 2}
    assert tables.table_rows(report)[0][1] == "failed"
    assert report["rows"][1]["test"]["diverged"] == 0
    # Its cost, too, is a reported failure, and the other rows are measured.
    assert report["costs"][row["name"]]["error"] == "RuntimeError: kernel exploded"
    assert tables.cost_rows(report)[0] == [row["name"], *["failed"] * 4]
    assert report["costs"]["Adam"]["bytes_per_param"] == 8


def _row(name, role, accs, diverged=()):
    return {"name": name, "role": role,
            "seeds": [{"seed": k, "test_acc": 0.0 if k in diverged else a,
                       "reason": "diverged: training loss nan" if k in diverged else None}
                      for k, a in enumerate(accs)]}


EVO = [0.90, 0.91, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99]
STEPS = [0.01, -0.02, 0.03, 0.0, -0.01, 0.02, 0.04, -0.03, 0.01, 0.0]


def test_paired_wilcoxon_and_holm_against_each_baseline():
    from scipy.stats import wilcoxon

    report = {"seed": 0, "rows": [_row("evo", "candidate", EVO),
                                  _row("A", "baseline", [e - 0.05 for e in EVO]),
                                  _row("B", "baseline", [e - d for e, d in zip(EVO, STEPS)])]}
    tables.summarise(report)
    to_a, to_b = report["comparisons"]
    assert (to_a["candidate"], to_a["baseline"], to_b["baseline"]) == ("evo", "A", "B")
    assert to_a["p"] == pytest.approx(2 / 2 ** 10)  # every seed won: the smallest p there is
    assert (to_a["wins"], to_a["ties"], to_a["losses"]) == (10, 0, 0)
    expected = wilcoxon(np.round(STEPS, 12), zero_method="pratt").pvalue
    assert to_b["p"] == pytest.approx(expected)
    assert (to_b["wins"], to_b["ties"], to_b["losses"]) == (5, 2, 3)
    assert to_a["p_holm"] == pytest.approx(2 * to_a["p"])  # the smaller of 2, times 2
    assert to_b["p_holm"] == pytest.approx(max(to_b["p"], 2 * to_a["p"]))
    assert to_a["verdict"] == "better" and to_b["verdict"] == "not distinguishable"
    assert to_a["median"]["estimate"] == pytest.approx(0.05)
    assert to_b["mean"]["low"] <= to_b["mean"]["estimate"] <= to_b["mean"]["high"]
    cells = tables.paired_rows(report)
    assert cells[0][:3] == ["evo", "A", "10/0/0"] and cells[0][3].startswith("+5.00 [+5.00, +5.00]")
    line = tables.verdicts(report)[0]
    assert "evo: better than A; not distinguishable from B" in line and "more seeds" not in line


def test_pairing_is_by_seed_and_diverged_seeds_count():
    def report(rows):
        data = {"seed": 0, "rows": rows}
        tables.summarise(data)
        return data["comparisons"]

    base = _row("B", "baseline", [e - d for e, d in zip(EVO, STEPS)])
    straight = report([_row("evo", "candidate", EVO), base])
    shuffled = _row("evo", "candidate", EVO)
    shuffled["seeds"] = shuffled["seeds"][::-1][3:] + shuffled["seeds"][::-1][:3]
    assert report([shuffled, base]) == straight  # completion order does not matter
    short = _row("evo", "candidate", EVO)
    del short["seeds"][4]
    with pytest.raises(ValueError, match=r"seeds do not pair: only A ran none, only B ran \[4\]"):
        report([short, base])
    crashed = report([_row("evo", "candidate", EVO, diverged={0, 1}), base])[0]
    assert crashed["diverged"] == [2, 0] and crashed["n"] == 10  # counted, at accuracy 0
    assert crashed["losses"] == straight[0]["losses"] + 1  # seed 0 won before, seed 1 lost anyway


def test_outputs_json_markdown_and_plot(tmp_path):
    report = run_compare(contenders(), settings())
    paths = tables.write_outputs(report, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["rows"][0]["role"] == "candidate" and len(data["rows"][1]["seeds"]) == 2
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| Adam |" in paths["markdown"].read_text()


@pytest.mark.parametrize("key, per_param", [("adam", 8), ("adamw", 8), ("sgd", 0),
                                            ("nesterov", 4), ("lion", 4), ("rmsprop", 4),
                                            ("sign", 0)])
def test_state_memory_is_bytes_of_per_weight_state_per_parameter(key, per_param):
    """Adam keeps two float32 moments (8 bytes a weight; its step counter is one scalar per
    tensor, left out), Nesterov and Lion one buffer, SGD and Sign nothing."""
    import numba

    row = baseline_contender(key)
    threads = (torch.get_num_threads(), numba.get_num_threads())
    found = cost.measure(TINY, row.program, 1e-3, 0.01 if row.tune_decay else 0.0)
    assert (torch.get_num_threads(), numba.get_num_threads()) == threads  # one while timed
    assert found["bytes_per_param"] == per_param
    assert found["parameters"] == sum(p.numel() for p in TINY.build_model(0).parameters())
    assert found["step_seconds"] > 0


def test_the_report_has_the_cost_against_adams(tmp_path):
    report = run_compare(contenders("weight: mul(0.05, grad)", "adam", "sgd", "nesterov"),
                         settings(trials=2, seeds=1))
    costs = report["costs"]
    assert list(costs) == [row["name"] for row in report["rows"]]
    assert [costs[n]["memory_vs_adam"] for n in ("Adam", "SGD", "Nesterov")] == [1.0, 0.0, 0.5]
    assert costs["Adam"]["step_vs_adam"] == 1.0
    assert all(c["step_vs_adam"] > 0 for c in costs.values())
    assert set(report["seconds"]) == {"tuning", "seeds", "total"}
    md = tables.write_outputs(report, tmp_path)["markdown"].read_text()
    assert "## Cost" in md and "| Nesterov |" in md.split("## Cost")[1]
    assert "tuning" in md and "seeds" in md.split("Wall time")[1]
    # Without an Adam row the ratios are to Adam measured apart.
    alone = run_compare(contenders("weight: mul(0.05, grad)", "nesterov"),
                        settings(trials=1, seeds=1))
    assert alone["costs"]["Nesterov"]["memory_vs_adam"] == 0.5


# -- the CLI -----------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["weight: mul(0.1, grad)", "--task", "nope"], "unknown task 'nope'"),
    (["weight: mul(0.1, grad)", "--optimizers", "adam,lamb"], "unknown optimizer 'lamb'"),
    (["{rundir}"], "no summary.json there"),
    (["weight: mul(0.1, gard)"], "cannot parse the program"),
    (["no-such-file"], "neither a file, a run directory nor a program text"),
    (["weight: mul(0.1, grad)", "--seeds", "0"], "must be at least 1"),
    (["weight: mul(0.1, grad)", "--lr-range", "1", "0.1"], "need 0 < LOW < HIGH"),
    (["weight: mul(0.1, grad)", "--wd-range", "0.1", "0.01"], "need 0 < LOW < HIGH < 1"),
    (["weight: mul(0.1, grad)", "--wd-range", "0", "0.1"], "--wd-range 0 0.1"),
])
def test_bad_inputs_are_one_line_and_exit_2(args, message, tmp_path, capsys):
    args = [a.replace("{rundir}", str(tmp_path)) for a in args]
    assert cli.main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("engine.compare: error: ") and message in err
    assert not (tmp_path / "out").exists()


def test_a_backend_that_cannot_run_on_the_cpu_is_refused_up_front(tmp_path, capsys, monkeypatch):
    """compare trains on the CPU: the registry says whether the chosen backend runs there."""
    monkeypatch.delenv("TRITON_INTERPRET")
    assert cli.main(["weight: mul(0.1, grad)", "--backend", "triton",
                         "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--backend triton: compare trains on the CPU" in err
    assert "TRITON_INTERPRET=1" in err and not (tmp_path / "out").exists()


def test_cli_end_to_end(tmp_path):
    """The module as a user runs it: a bad input exits 2, a tiny comparison writes its files."""
    bad = subprocess.run([sys.executable, "-m", "engine.compare", "weight: (", "--task", "digits"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    out = tmp_path / "cmp"
    ok = subprocess.run([sys.executable, "-m", "engine.compare", "weight: mul(0.05, grad)",
                         "--task", "digits", "--epochs", "2", "--trials", "3", "--seeds", "2",
                         "--optimizers", "sign", "--workers", "1", "--out", str(out)],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "Sign" in ok.stdout and (out / "compare.md").is_file() and (out / "curves.png").is_file()


@pytest.mark.slow
def test_workers_do_not_change_the_table():
    serial = run_compare(contenders(), settings(), workers=1)
    pooled = run_compare(contenders(), settings(), workers=2)
    assert without_times(serial["rows"]) == without_times(pooled["rows"])
