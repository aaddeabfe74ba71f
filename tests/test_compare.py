"""`engine.compare`: fair tuning, no test data while tuning, reproducible tables, divergence shown.

Everything here trains on scikit-learn's bundled digits data (no download, no Fashion-MNIST
needed) with a 2-epoch budget and a handful of trials, so each comparison takes about a second.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from codegen.ir import Program
from engine import compare, heldout
from engine.compare import Settings, baseline, candidate, run_compare
from kernels import zoo

ROOT = Path(__file__).resolve().parent.parent
TINY = dataclasses.replace(heldout.get_task("digits"), epochs=2)
NAN_PROGRAM = "weight: sqrt(neg(square(grad)))"  # NaN for every nonzero gradient
# NaN exactly where lr * |grad| > 1: diverges at large step factors only.
EDGY_PROGRAM = "weight: mul(lr, div(grad, sqrt(sub(1.0, square(mul(lr, grad))))))"


def settings(**overrides) -> Settings:
    return Settings(**{"task": TINY, "seeds": 2, "trials": 4, **overrides})


def contenders(text: str = "weight: mul(0.05, grad)", *keys: str):
    return [candidate(Program.parse(text)), *(baseline(k) for k in keys or ("adam", "sign"))]


def without_times(value):
    """The report minus wall-clock fields, which are the only thing allowed to change."""
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if k not in ("seconds",)}
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
    assert baseline("adam").tuned == baseline("adamw").tuned == "learning rate"
    assert baseline("ades").tuned == baseline("sign").tuned == "step factor"


def test_adamw_is_adam_with_torchs_default_weight_decay():
    adamw, adam = baseline("adamw"), baseline("adam")
    assert adamw.name == "AdamW" and adamw.program == adam.program == str(zoo.adam())
    assert (adamw.weight_decay, adam.weight_decay) == (0.01, 0.0)
    assert "weight_decay=0.01" in adamw.source and "not tuned" in adamw.source
    # Same lr, same seeds: the training differs by the weight decay alone, and it is applied.
    s = settings()
    with_decay, _ = compare._train(s, adamw, 1e-2, 1, 2)
    without, _ = compare._train(s, adam, 1e-2, 1, 2)
    assert any(not torch.equal(p, q) for p, q in zip(with_decay.parameters(),
                                                     without.parameters()))
    report = run_compare([adam, adamw], settings(trials=1, seeds=1))
    assert [row["weight_decay"] for row in report["rows"]] == [0.0, 0.01]


def test_program_from_text_file_and_run_directory(tmp_path):
    text = "weight: mul(0.001, sign(grad))"
    assert compare.resolve_program(text)[0] == Program.parse(text)
    (tmp_path / "p.txt").write_text(text + "\n")
    assert compare.resolve_program(str(tmp_path / "p.txt"))[0] == Program.parse(text)
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"run": "r", "mode": "alr",
                                                  "best": {"program": text}}))
    program, source = compare.resolve_program(str(run))
    assert program == Program.parse(text) and "summary.json" in source
    (run / "summary.json").write_text(json.dumps({"mode": "dlr", "best": {"program": "0.01"}}))
    with pytest.raises(compare.UsageError, match="DLR"):
        compare.resolve_program(str(run))


def test_tasks_have_disjoint_fixed_splits():
    task = heldout.get_task("digits")
    a, b = heldout.train_val(task, 0), heldout.train_val(task, 0)
    assert a is b or torch.equal(a.train[0], b.train[0])
    x_test, _ = heldout.load_test_split(task, 0)
    rows = {tuple(r.tolist()) for r in a.train[0]}
    assert not rows & {tuple(r.tolist()) for r in x_test}  # digits has few exact duplicates
    assert len(a.train[1]) == 997 and len(a.val[1]) == 350 and len(x_test) == 450
    assert not torch.equal(heldout.train_val(task, 1).train[0], a.train[0])
    with pytest.raises(ValueError, match="unknown task 'nope'; choose one of: quick"):
        heldout.get_task("nope")


# -- the guarantees ----------------------------------------------------------------------------

def test_tuning_never_reads_the_test_split(monkeypatch):
    """A spy records every test-data read; tuning runs first and reads none. Then the test split
    is poisoned (labels rotated): the tuning and the chosen values stay identical to the bit,
    only the test accuracies move. Tuning could not have looked."""
    events = []
    real_tune, real_test = compare.tune, heldout.load_test_split

    def spy_tune(job):
        events.append("tune")
        return real_tune(job)

    def spy_test(task, seed):
        events.append("test")
        return real_test(task, seed)

    monkeypatch.setattr(compare, "tune", spy_tune)
    monkeypatch.setattr(heldout, "load_test_split", spy_test)
    clean = run_compare(contenders(), settings())
    assert events.count("tune") == 3 and "test" in events
    assert "test" not in events[: max(i for i, e in enumerate(events) if e == "tune") + 1]

    def poisoned(task, seed):
        x, y = real_test(task, seed)
        return x, (y + 1) % 10

    monkeypatch.setattr(heldout, "load_test_split", poisoned)
    bad = run_compare(contenders(), settings())
    for a, b in zip(clean["rows"], bad["rows"]):
        assert without_times(a["tuning"]) == without_times(b["tuning"])
        assert a["lr"] == b["lr"]
        assert [s["best_val"] for s in a["seeds"]] == [s["best_val"] for s in b["seeds"]]
    assert [r["test"]["mean"] for r in clean["rows"]] != [r["test"]["mean"] for r in bad["rows"]]

    def forbidden(task, seed):
        raise AssertionError("tuning read the test split")

    monkeypatch.setattr(heldout, "load_test_split", forbidden)
    for contender in contenders():
        compare.tune(compare.TuneJob(settings(), contender))  # never calls it


def test_same_seed_same_table_other_seed_other_table():
    first = run_compare(contenders(), settings())
    again = run_compare(contenders(), settings())
    assert compare.table_rows(first) == compare.table_rows(again)
    assert without_times(first) == without_times(again)
    other = run_compare(contenders(), settings(seed=1))
    assert compare.table_rows(other) != compare.table_rows(first)


def test_every_optimizer_gets_the_same_tuning_budget_and_start():
    report = run_compare(contenders(), settings(trials=5))
    startup = report["sampler"]["n_startup_trials"]
    firsts = [[t["lr"] for t in row["tuning"]["trials"][:startup]] for row in report["rows"]]
    assert all(len(row["tuning"]["trials"]) == 5 for row in report["rows"])
    assert firsts[0] == firsts[1] == firsts[2]  # one sampler seed: the same random start for all
    assert all(compare.LR_RANGE[0] <= t["lr"] <= compare.LR_RANGE[1]
               for row in report["rows"] for t in row["tuning"]["trials"])


def test_a_diverging_program_is_reported_not_hidden(tmp_path):
    report = run_compare([candidate(Program.parse(NAN_PROGRAM)), baseline("sign")], settings())
    row = report["rows"][0]
    assert row["tuning"]["diverged"] == 4
    assert row["test"]["diverged"] == 2 and row["test"]["mean"] == 0.0  # counted at the floor
    cells = compare.table_rows(report)[0]
    assert cells[3] == "4/4" and cells[5] == "2/2" and cells[4].startswith("0.00 ±")
    paths = compare.write_outputs(report, tmp_path)
    md = paths["markdown"].read_text()
    assert "| 4/4 |" in md and "| 2/2 |" in md and "diverged: training loss nan" in md


def test_divergence_at_some_tuned_settings_is_counted():
    report = run_compare([candidate(Program.parse(EDGY_PROGRAM))],
                         settings(trials=5, lr_range=(1e-2, 1e3)))
    tuning = report["rows"][0]["tuning"]
    assert 0 < tuning["diverged"] < 5
    assert all(t["val_acc"] == 0.0 for t in tuning["trials"] if t["reason"])
    assert report["rows"][0]["test"]["diverged"] == 0  # the chosen factor is a finite one


def test_a_crashing_optimizer_is_a_failed_row_not_a_crash(monkeypatch):
    real_tune = compare.tune

    def tune(job):
        if job.contender.role == "candidate":
            raise RuntimeError("kernel exploded")
        return real_tune(job)

    monkeypatch.setattr(compare, "tune", tune)
    report = run_compare(contenders(), settings())
    row = report["rows"][0]
    assert row["failed"] == "tuning failed: raised: RuntimeError: kernel exploded"
    assert row["test"] == {"mean": 0.0, "sd": 0.0, "median": 0.0, "n": 2, "diverged": 2}
    assert compare.table_rows(report)[0][1] == "failed"
    assert report["rows"][1]["test"]["diverged"] == 0


def test_rank_sum_against_the_best_baseline():
    def row(name, role, accs):
        return {"name": name, "role": role,
                "seeds": [{"test_acc": a, "reason": None} for a in accs]}

    report = {"rows": [row("evo", "candidate", [0.90, 0.91, 0.92, 0.93, 0.94]),
                       row("A", "baseline", [0.80, 0.81, 0.82, 0.83, 0.84]),
                       row("B", "baseline", [0.85, 0.86, 0.87, 0.88, 0.89])]}
    compare.summarise(report)
    evo, a, b = report["rows"]
    assert report["best_baseline"] == "B"
    assert evo["vs"] == "B" and b["vs"] == "A" and a["vs"] == "B"
    assert evo["p"] == pytest.approx(2 / 252)  # exact two-sided test, complete separation
    assert evo["delta"] == pytest.approx(0.05)
    assert compare.smallest_p(5, 5) == pytest.approx(2 / 252)


def test_outputs_json_markdown_and_plot(tmp_path):
    report = run_compare(contenders(), settings())
    paths = compare.write_outputs(report, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["rows"][0]["role"] == "candidate" and len(data["rows"][1]["seeds"]) == 2
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| Adam |" in paths["markdown"].read_text()


# -- the CLI -----------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["weight: mul(0.1, grad)", "--task", "nope"], "unknown task 'nope'"),
    (["weight: mul(0.1, grad)", "--optimizers", "adam,lion"], "unknown optimizer 'lion'"),
    (["{rundir}"], "no summary.json there"),
    (["weight: mul(0.1, gard)"], "cannot parse the program"),
    (["no-such-file"], "neither a file, a run directory nor a program text"),
    (["weight: mul(0.1, grad)", "--seeds", "0"], "must be at least 1"),
    (["weight: mul(0.1, grad)", "--lr-range", "1", "0.1"], "need 0 < LOW < HIGH"),
])
def test_bad_inputs_are_one_line_and_exit_2(args, message, tmp_path, capsys):
    args = [a.replace("{rundir}", str(tmp_path)) for a in args]
    assert compare.main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("engine.compare: error: ") and message in err
    assert not (tmp_path / "out").exists()


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
