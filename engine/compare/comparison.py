"""`python -m engine.compare`: is an evolved optimizer better than tuned human ones, on this task?

A fair answer needs the same treatment for everyone, so every optimizer in the table goes through
the same three steps:

1. Tune: one number per optimizer, its step size, by Optuna's TPE sampler with the same number
   of trials and the same log-uniform range for all: the optimizer's own ``lr``. Each optimizer's
   sampler has its own seed, derived from the run seed and the optimizer's name (stable across
   runs): with one shared seed every row would try the same first values, and tuned values would
   repeat across rows by construction rather than by merit. A tuned value within 5% of the
   log-range of either end is flagged in the table: the best value may lie outside the range. For
   Adam, AdamW, Lion, RMSprop and Nesterov it is the learning rate; an evolved program (whose step
   size comes from its own evolved constants) never reads ``lr``, so EvolvedOptimizer scales its
   weight update by it, a global step factor; ADES and Sign, themselves evolved, read ``lr`` as
   that factor. AdamW's weight decay is not tuned: it stays at torch.optim.AdamW's default, 0.01
   (one tuned number per optimizer keeps the budget the same for all). Each trial trains once (a
   fixed tuning seed) and scores the best validation accuracy: tuning never sees the test split,
   which is loaded only in step 2.
2. Train N seeds (initial weights, batch order, dropout) with the tuned value; every run trains
   the task's full epoch budget and keeps its best-validation epoch, whose test accuracy counts.
   A run whose loss goes non-finite is *diverged*: it counts at accuracy 0 (the project's floor)
   and the table says how many; a trial that diverges while tuning scores 0 there too, and is
   counted. Nothing is dropped.
3. Compare: mean +- sd of test accuracy per row; then each candidate against each baseline on
   the same seeds (paired by seed): two-sided Wilcoxon signed-rank test, Holm-corrected over
   every comparison of the table, and the median and mean paired difference with a seeded
   bootstrap 95% interval (`engine.compare.stats` documents each choice).

Every optimizer runs as `kernels.EvolvedOptimizer` with a `kernels.zoo` program, the human ones
included (they reproduce torch.optim step for step; tests/test_zoo.py). One runtime for every row
means a difference in the table can only come from the update rule, not from two code paths.

Outputs (``--out``): compare.md, compare.json, curves.png (validation accuracy per epoch, mean
over seeds; and each trial's validation accuracy against its tuned value). User errors are one
line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import shlex
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from codegen import backends
from codegen.ir import ParseError, Program
from engine import modes
from engine.compare import stats
from engine.tasks import compare_tasks
from engine.app.cli import Parser, UsageError, positive_int
from engine.tasks.compare_tasks import CompareTask
from engine.tasks.protocol import FLOOR_FITNESS, derive_seed

__all__ = ["BASELINES", "LR_RANGE", "Contender", "Settings", "UsageError", "baseline_contender",
           "candidate", "main", "resolve_program", "run_compare", "sampler_seed"]

FORMAT, VERSION = "autolr-compare", 2  # 2: "comparisons" replace each row's vs/delta/p
# AdamW and Lion by default, next to Adam. Adagrad and AdaBelief are one `--optimizers` away
# rather than in every table: each row costs its own tuning budget (trials + seeds trainings), and
# neither adds a new kind of update to the default set (AdaBelief is Adam with a centred second
# moment, Adagrad RMSprop without forgetting).
BASELINES = ("adam", "adamw", "lion", "rmsprop", "nesterov", "ades", "sign")
# Baselines that are a zoo program with decoupled weight decay: key -> (zoo key, weight decay).
# 0.01 is torch.optim.AdamW's default, kept fixed (only lr is tuned, as for every row).
WEIGHT_DECAY = {"adamw": ("adam", 0.01)}
LR_RANGE = (1e-5, 10.0)  # log-uniform, the same for every optimizer
NAMES = {"adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop", "nesterov": "Nesterov",
         "ades": "ADES", "sign": "Sign", "sgd": "SGD", "momentum": "Momentum", "lion": "Lion",
         "adagrad": "Adagrad", "adabelief": "AdaBelief"}
_TUNE, _FINAL, _SAMPLER, _BOOTSTRAP = 11, 12, 13, 14  # seed purposes
ALPHA = 0.05  # family-wise error rate of a table (Holm)
RESAMPLES = 10_000  # bootstrap resamples per interval


# -- who competes -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Contender:
    """One row: a program run by EvolvedOptimizer whose runtime `lr` is the tuned value.

    `role` is "candidate" (what is being tested) or "baseline"; `tuned` says what `lr` means.
    """

    name: str
    program: str
    role: str
    tuned: str  # "learning rate" or "step factor"
    source: str = ""  # where it came from: a run summary, a file, "text", a zoo call
    weight_decay: float = 0.0  # EvolvedOptimizer's (decoupled), fixed while lr is tuned


def candidate(program: Program, source: str = "text") -> Contender:
    """The row of a program under test: named by its hash. Its tuned `lr` is a step factor:
    EvolvedOptimizer scales the weight update of a program that never reads `lr` by it."""
    return Contender(name=f"evolved {program.hash[:8]}", program=str(program),
                     role="candidate", tuned="step factor", source=source)


def baseline_contender(key: str) -> Contender:
    from kernels import zoo

    zoo_key, weight_decay = WEIGHT_DECAY.get(key, (key, 0.0))
    if zoo_key not in zoo.ZOO:
        raise UsageError(f"unknown optimizer {key!r}; choose from: "
                         f"{', '.join([*zoo.ZOO, *WEIGHT_DECAY])}")
    human = zoo_key in ("sgd", "momentum", "nesterov", "rmsprop", "adam", "lion", "adagrad",
                        "adabelief")
    source = f"kernels.zoo.{zoo_key}() (its defaults for the other settings)" if human else \
        f"kernels.zoo.{zoo_key}() (its constants as evolved)"
    if weight_decay:
        source = (f"kernels.zoo.{zoo_key}() with weight_decay={weight_decay:g} (decoupled, "
                  "torch.optim.AdamW's default; not tuned), its defaults for the rest")
    return Contender(name=NAMES.get(key, key), program=str(zoo.ZOO[zoo_key]()), role="baseline",
                     tuned="learning rate" if human else "step factor", source=source,
                     weight_decay=weight_decay)


def resolve_program(arg: str) -> tuple[Program, str]:
    """A program from text, a file holding one, or a run directory (its summary.json's best).

    Returns the program and where it came from, for the report."""
    path = Path(arg)
    source = "text"
    if path.is_dir() or path.suffix == ".json":
        summary = path / "summary.json" if path.is_dir() else path
        if not summary.is_file():
            raise UsageError(f"{arg}: no summary.json there; pass a finished run directory "
                             "(engine.run writes summary.json at the end), a program file or "
                             "program text")
        try:
            data = json.loads(summary.read_text(encoding="utf-8"))
            text, mode = data["best"]["program"], data.get("mode", modes.DEFAULT.name)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UsageError(f"{summary}: not a run summary with a best program ({err})") from None
        kind = modes.find(mode)
        if kind is None or not kind.compiled:
            what = kind.candidate if kind else "an unknown mode"
            raise UsageError(f"{summary}: a {str(mode).upper()} run ({what}); compare takes "
                             "ALR optimizers")
        source = f"best program of {summary}"
    elif path.is_file():
        text, source = path.read_text(encoding="utf-8"), str(path)
    elif ":" in arg:
        text = arg
    else:
        raise UsageError(f"{arg!r} is neither a file, a run directory nor a program text "
                         "(like 'weight: mul(0.001, grad)')")
    try:
        return Program.parse(text), source
    except (ParseError, ValueError) as err:
        raise UsageError(f"cannot parse the program from {arg if len(arg) < 60 else 'the text'}:"
                         f" {' '.join(str(err).split())}") from None


# -- the settings, the jobs -------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """Everything that decides the table besides the contenders."""

    task: CompareTask
    seeds: int = 5
    trials: int = 15
    seed: int = 0  # split seed, and the root of every sampler and training seed
    lr_range: tuple[float, float] = LR_RANGE
    backend: str = "auto"

    @property
    def startup_trials(self) -> int:
        """Random trials before TPE models the results (Optuna's default of 10 would leave
        almost nothing guided at our budgets)."""
        return min(self.trials, max(3, self.trials // 3))


def _seed(settings: Settings, purpose: int, k: int) -> int:
    # 31 bits: what the comparison has always drawn (its published tables depend on them).
    return derive_seed(settings.seed, purpose, k, bits=31)


def sampler_seed(settings: Settings, name: str) -> int:
    """The TPE seed of the optimizer called `name`: its own, and the same in every run."""
    return derive_seed(settings.seed, _SAMPLER, zlib.crc32(name.encode("utf-8")), bits=31)


@dataclass(frozen=True)
class TuneJob:
    settings: Settings
    contender: Contender


@dataclass(frozen=True)
class SeedJob:
    settings: Settings
    contender: Contender
    lr: float
    index: int


def _train(settings: Settings, contender: Contender, lr: float, init_seed: int, fit_seed: int):
    """One training run on the train split, validated on the validation split. No test data."""
    from engine.tasks.training import fit
    from kernels import EvolvedOptimizer

    task = settings.task
    splits = compare_tasks.train_val(task, settings.seed)

    def optimizer_for(model):
        return EvolvedOptimizer(model.parameters(), contender.program, lr,
                                weight_decay=contender.weight_decay, backend=settings.backend)

    if task.source == "supervised":  # a SupervisedTask: its loss, its metric as "val_acc"
        from engine.tasks.supervised import Loaded, fit_supervised

        data = Loaded(splits.train, splits.val, None)
        return fit_supervised(compare_tasks.supervised(task), data,
                              optimizer_for, init_seed=init_seed, shuffle_seed=fit_seed,
                              epochs=task.epochs, patience=task.epochs)
    model = task.build_model(init_seed)
    optimizer = optimizer_for(model)
    result = fit(model, optimizer, splits.train, splits.val, seed=fit_seed,
                 batch_size=task.batch_size, max_epochs=task.epochs, patience=task.epochs,
                 monitor="val_acc", eval_batch=task.eval_batch)
    return model, result


def tune(job: TuneJob) -> dict:
    """TPE over the contender's `lr`; each trial's score is its best validation accuracy."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = job.settings
    start = time.perf_counter()
    seed = sampler_seed(s, job.contender.name)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=s.startup_trials)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    trials = []
    for _ in range(s.trials):
        trial = study.ask()
        lr = trial.suggest_float("lr", *s.lr_range, log=True)
        _, result = _train(s, job.contender, lr, _seed(s, _TUNE, 0), _seed(s, _TUNE, 1))
        value = FLOOR_FITNESS if result.reason else max(result.val_acc, default=FLOOR_FITNESS)
        study.tell(trial, value)
        trials.append({"lr": lr, "val_acc": value, "reason": result.reason})
    best = max(range(len(trials)), key=lambda i: (trials[i]["val_acc"], -i))
    lr = trials[best]["lr"]
    return {"lr": lr, "best_val": trials[best]["val_acc"], "trials": trials,
            "diverged": sum(t["reason"] is not None for t in trials), "sampler_seed": seed,
            "edge": {"lr": stats.at_edge(lr, *s.lr_range)},
            "seconds": time.perf_counter() - start}


def train_seed(job: SeedJob) -> dict:
    """Seed `index` on the tuned value; the test split is read here and only here."""
    from engine.tasks.training import loss_accuracy

    s = job.settings
    start = time.perf_counter()
    model, result = _train(s, job.contender, job.lr, _seed(s, _FINAL, 2 * job.index),
                           _seed(s, _FINAL, 2 * job.index + 1))
    test_acc = FLOOR_FITNESS
    if result.reason is None and s.task.source == "supervised":
        from engine.tasks.supervised import metric_value

        test_acc = metric_value(compare_tasks.supervised(s.task), model,
                                compare_tasks.load_test_split(s.task, s.seed))[1]
    elif result.reason is None:
        test_acc = loss_accuracy(model, *compare_tasks.load_test_split(s.task, s.seed),
                                 batch_size=s.task.eval_batch)[1]
    return {"seed": job.index, "test_acc": test_acc, "reason": result.reason,
            "best_val": max(result.val_acc, default=FLOOR_FITNESS), "epochs": result.epochs,
            "val_curve": list(result.val_acc), "seconds": time.perf_counter() - start}


# -- the comparison ---------------------------------------------------------------------------

def _executor(workers: int):
    from engine.exec.executors import make_executor
    from engine.tasks.training import configure_process

    init = functools.partial(configure_process, threads=1)
    if workers == 1:
        return make_executor("serial", initializer=init)
    return make_executor("local", workers, initializer=init)


def _floor_seed(index: int, reason: str) -> dict:
    """A seed that gave no trained model (its job crashed, or tuning did): accuracy 0."""
    return {"seed": index, "test_acc": FLOOR_FITNESS, "reason": reason, "best_val": FLOOR_FITNESS,
            "epochs": 0, "val_curve": [], "seconds": 0.0}


def run_compare(contenders: Sequence[Contender], settings: Settings, workers: int = 1,
                log: Callable[[str], None] = lambda line: None) -> dict:
    """Tune every contender, then train its seeds; returns the report (see `write_outputs`).

    Two phases on purpose: every tuning finishes before any job that reads test data starts.
    Results do not depend on `workers` (every training runs on one thread, from fixed seeds).
    """
    start = time.perf_counter()
    rows = [{"name": c.name, "role": c.role, "tuned": c.tuned, "program": c.program,
             "source": c.source, "weight_decay": c.weight_decay, "failed": None,
             "tuning": None, "lr": None, "seeds": []}
            for c in contenders]
    with _executor(workers) as executor:
        jobs = [TuneJob(settings, c) for c in contenders]
        for i, outcome in executor.run(tune, jobs):
            row = rows[i]
            if not outcome.ok:
                row["failed"] = f"tuning failed: {outcome.reason}"
                log(f"{row['name']}: {row['failed']}")
                continue
            row["tuning"], row["lr"] = outcome.value, outcome.value["lr"]
            log(f"tuned {row['name']}: {row['tuned']} {row['lr']:.3g}, best validation "
                f"{outcome.value['best_val']:.4f} ({outcome.value['diverged']} of "
                f"{settings.trials} trials diverged) in {outcome.value['seconds']:.0f} s")
        tuned_at = time.perf_counter()
        jobs = [SeedJob(settings, c, rows[i]["lr"], k) for i, c in enumerate(contenders)
                if rows[i]["failed"] is None for k in range(settings.seeds)]
        owner = [next(i for i, c in enumerate(contenders) if c is j.contender) for j in jobs]
        for n, outcome in executor.run(train_seed, jobs):
            rows[owner[n]]["seeds"].append(
                outcome.value if outcome.ok else _floor_seed(jobs[n].index, outcome.reason))
    for row in rows:
        row["seeds"].sort(key=lambda r: r["seed"])
        if row["failed"]:  # no tuned value, so no run: every seed counts at the floor
            row["seeds"] = [_floor_seed(k, row["failed"]) for k in range(settings.seeds)]
    end = time.perf_counter()
    task = settings.task
    report = {
        "format": FORMAT, "version": VERSION,
        "task": {"name": task.name, "about": task.about, "epochs": task.epochs,
                 "batch_size": task.batch_size, "model": repr(task.model)},
        "seeds": settings.seeds, "trials": settings.trials, "seed": settings.seed,
        "lr_range": list(settings.lr_range), "backend": settings.backend,
        "sampler": {"name": "optuna TPESampler", "n_startup_trials": settings.startup_trials,
                    "seeds": {c.name: sampler_seed(settings, c.name) for c in contenders}},
        "rows": rows,
        "seconds": {"tuning": tuned_at - start, "seeds": end - tuned_at, "total": end - start},
        "workers": workers,
    }
    summarise(report)
    return report


def _results(row: dict) -> list[tuple[int, float | None]]:
    """A row's (seed, test accuracy) pairs; None where the run diverged or never ran."""
    return [(r["seed"], None if r["reason"] else r["test_acc"]) for r in row["seeds"]]


def paired_comparison(mine: dict, theirs: dict, seed: int) -> dict:
    """One candidate row against one baseline row, paired by seed (see `engine.compare.stats`); a seed
    that only one of them ran is a ValueError, never silently left out."""
    return {"candidate": mine["name"], "baseline": theirs["name"],
            **stats.compare_pair(_results(mine), _results(theirs), FLOOR_FITNESS, seed,
                                 RESAMPLES)}


def summarise(report: dict) -> None:
    """Adds per-row statistics and the paired comparisons (`report["comparisons"]`), in place.

    Every candidate is compared with every baseline; Holm's correction runs over all of those
    comparisons together, since a reader scans the whole table for a win."""
    rows = report["rows"]
    for row in rows:
        accs = [r["test_acc"] for r in row["seeds"]]
        row["test"] = {"mean": float(np.mean(accs)) if accs else None,
                       "sd": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
                       "median": float(np.median(accs)) if accs else None,
                       "n": len(accs),
                       "diverged": sum(r["reason"] is not None for r in row["seeds"])}
    ranked = sorted((r for r in rows if r["role"] == "baseline"), key=lambda r: -r["test"]["mean"])
    report["best_baseline"] = ranked[0]["name"] if ranked else None
    boot = derive_seed(report["seed"], _BOOTSTRAP, bits=31)
    found = [paired_comparison(c, b, boot) for c in rows if c["role"] == "candidate"
             for b in rows if b["role"] == "baseline"]
    for entry, adjusted in zip(found, stats.holm([e["p"] for e in found])):
        entry["p_holm"] = adjusted
        significant = adjusted < ALPHA and entry["direction"] != 0
        entry["verdict"] = ("better" if entry["direction"] > 0 else "worse") if significant \
            else "not distinguishable"
    report["comparisons"] = found
    report["stats"] = {
        "pairing": "by seed: seed k has the same initial weights, batch order and dropout in "
                   "every row",
        "test": "Wilcoxon signed-rank on candidate - baseline test accuracy, two-sided; zero "
                "differences by Pratt's method",
        "correction": f"Holm over all {len(found)} comparisons, alpha {ALPHA}",
        "effect": f"median and mean paired difference, percentile bootstrap 95% interval "
                  f"({RESAMPLES} resamples of seed pairs, seed {boot})",
        "floor": FLOOR_FITNESS, "alpha": ALPHA, "bootstrap_seed": boot,
        "resamples": RESAMPLES}


# -- the outputs ------------------------------------------------------------------------------

COLUMNS = ("optimizer", "tuned", "tuning val %", "diverged trials", "test acc % (mean ± sd)",
           "diverged seeds")
PAIRED_COLUMNS = ("candidate", "vs baseline", "wins/ties/losses", "median Δ pp [95% CI]",
                  "mean Δ pp [95% CI]", "p", "Holm p", "verdict")


def _p(value: float) -> str:
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def table_rows(report: dict) -> list[list[str]]:
    """The table as strings: the same for the markdown, the terminal and the tests.

    `tuned` is the chosen learning rate ("lr 1e-3") or step factor ("x0.5"), marked
    "(low edge)" / "(high edge)" when it lies at an end of the search range."""
    out = []
    for row in report["rows"]:
        t, tuning = row["test"], row["tuning"]
        name = row["name"] + (" *" if row["role"] == "candidate" else "")
        if row["lr"] is None:
            lr = "failed"
        else:
            lr = f"lr {row['lr']:.3g}" if row["tuned"] == "learning rate" else f"x{row['lr']:.3g}"
            edges = [f"{k} " * (k != "lr") + f"{v} edge"
                     for k, v in (tuning.get("edge") or {}).items() if v]
            lr += f" ({', '.join(edges)})" if edges else ""
        val = "-" if tuning is None else f"{tuning['best_val'] * 100:.2f}"
        trials = "-" if tuning is None else f"{tuning['diverged']}/{report['trials']}"
        acc = f"{t['mean'] * 100:.2f} ± {t['sd'] * 100:.2f}"
        out.append([name, lr, val, trials, acc, f"{t['diverged']}/{t['n']}"])
    return out


def paired_rows(report: dict) -> list[list[str]]:
    """The paired table as strings: one row per (candidate, baseline) comparison."""
    def interval(ci: dict) -> str:
        return f"{ci['estimate'] * 100:+.2f} [{ci['low'] * 100:+.2f}, {ci['high'] * 100:+.2f}]"

    return [[c["candidate"], c["baseline"], f"{c['wins']}/{c['ties']}/{c['losses']}",
             interval(c["median"]), interval(c["mean"]), _p(c["p"]), _p(c["p_holm"]),
             c["verdict"]] for c in report.get("comparisons", [])]


def verdicts(report: dict) -> list[str]:
    """One line per candidate: which baselines it beats or loses to, and how that was tested."""
    found = report.get("comparisons", [])
    lines = []
    for name in dict.fromkeys(c["candidate"] for c in found):
        mine = [c for c in found if c["candidate"] == name]
        parts = [f"{word} {', '.join(c['baseline'] for c in mine if c['verdict'] == key)}"
                 for key, word in (("better", "better than"), ("worse", "worse than"),
                                   ("not distinguishable", "not distinguishable from"))
                 if any(c["verdict"] == key for c in mine)]
        n = min(c["n"] for c in mine)
        floor = min(1.0, len(found) * stats.smallest_p(n))
        many = f"{len(found)} comparison{'s' * (len(found) != 1)}"
        small = (f" With {n} seeds and {many} the smallest Holm-corrected p is "
                 f"{floor:.3g}: no difference can reach {ALPHA}; run more seeds."
                 if floor >= ALPHA else "")
        lines.append(f"{name}: {'; '.join(parts)} (two-sided Wilcoxon signed-rank on {n} "
                     f"seed pairs, Holm-corrected over {many}, "
                     f"threshold {ALPHA}).{small}")
    return lines


def markdown(report: dict) -> str:
    task = report["task"]
    lines = [f"# Compare on `{task['name']}`", "", f"{task['about']}; {task['epochs']} epochs, "
             f"batch {task['batch_size']}.", "",
             f"Tuning: {report['trials']} TPE trials per optimizer (each optimizer its own "
             f"sampler seed, {report['sampler']['n_startup_trials']} random trials first), "
             f"log-uniform over [{report['lr_range'][0]:g}, {report['lr_range'][1]:g}], "
             f"scored on the validation split. Then {report['seeds']} seeds each on the tuned "
             "value, the same seeds for every optimizer; test accuracy of each run's "
             "best-validation epoch. A diverged run counts at accuracy 0 and is never dropped. "
             "`*` marks the candidate; \"(low edge)\" / \"(high edge)\": the tuned value lies "
             "within 5% of the log-range of that end, so the best value may lie outside it.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(report)]
    if report.get("comparisons"):
        st = report["stats"]
        lines += ["", "## Paired comparisons", "",
                  f"Each candidate against each baseline on the same seeds (Δ = candidate - "
                  f"baseline, percentage points). Test: {st['test']}. Correction: "
                  f"{st['correction']}. Effect: {st['effect']}.", "",
                  "| " + " | ".join(PAIRED_COLUMNS) + " |", "|" + "---|" * len(PAIRED_COLUMNS)]
        lines += ["| " + " | ".join(r) + " |" for r in paired_rows(report)]
    lines += ["", *verdicts(report)]
    reasons = sorted({r["reason"].split(" at epoch")[0] for row in report["rows"]
                      for r in row["seeds"] if r["reason"]})
    if reasons:
        lines += ["", "Runs that did not finish: " + "; ".join(reasons) + "."]
    lines += ["", "Programs (`lr` is the tuned value; compare.json has every program as run):", ""]
    for row in report["rows"]:
        if row["role"] == "candidate":
            scaled = "" if Program.parse(row["program"]).reads_lr else \
                ", its weight update scaled by the tuned factor (EvolvedOptimizer's lr)"
            lines += [f"- {row['name']} ({row['source']}), run as: "
                      f"`{'; '.join(row['program'].splitlines())}`{scaled}"]
        else:
            lines += [f"- {row['name']}: {row['source']}"]
    s = report["seconds"]
    lines += ["", f"Wall time {s['total']:.0f} s (tuning {s['tuning']:.0f} s, seeds "
                  f"{s['seeds']:.0f} s) with {report['workers']} worker(s).",
              f"Command: `{report.get('command', '')}`", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in report["rows"]:
        curves = [r["val_curve"] for r in row["seeds"] if r["reason"] is None and r["val_curve"]]
        style = "-" if row["role"] == "candidate" else "--"
        div = row["test"]["diverged"]
        label = row["name"] + (f" ({div} diverged)" if div else "")
        if curves:
            length = min(map(len, curves))
            mean = np.mean([c[:length] for c in curves], axis=0)
            left.plot(range(1, length + 1), mean * 100, style, marker="o", ms=3, label=label)
        if row["tuning"]:
            pts = sorted((t["lr"], t["val_acc"]) for t in row["tuning"]["trials"])
            right.plot([p[0] for p in pts], [p[1] * 100 for p in pts], style, marker="o", ms=3,
                       label=row["name"])
    left.set(xlabel="epoch", ylabel="validation accuracy (%)",
             title=f"{report['task']['name']}: mean over {report['seeds']} seeds (tuned)")
    right.set(xscale="log", xlabel="learning rate / step factor",
              ylabel="best validation accuracy (%)", title="tuning trials (0 = diverged)")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "compare.json", "markdown": out / "compare.md",
             "plot": out / "curves.png"}
    paths["json"].write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    paths["markdown"].write_text(markdown(report))
    plot(report, paths["plot"])
    return paths


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['task']['name']}: test accuracy over {report['seeds']} seeds "
                        f"({report['trials']} tuning trials each)")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("optimizer", "vs") else "right",
                         no_wrap=column in ("optimizer", "tuned", "test acc % (mean ± sd)"))
    for cells in table_rows(report):
        table.add_row(*cells)
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 160)  # a log file gets whole tables, line by line
    console.print(table)
    if report.get("comparisons"):
        paired = Table(title="paired by seed: candidate - baseline (two-sided Wilcoxon, Holm)")
        for column in PAIRED_COLUMNS:
            paired.add_column(column, justify="left" if column in (
                "candidate", "vs baseline", "verdict") else "right", no_wrap=True)
        for cells in paired_rows(report):
            paired.add_row(*cells)
        console.print(paired)
    for line in verdicts(report):
        console.print(line)


# -- the CLI ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m engine.compare",
                description="Compare an evolved optimizer with tuned Adam, Lion, RMSprop, "
                            "Nesterov, ADES and Sign: the same tuning budget for each (TPE over a "
                            "log-scale learning rate / step factor, on the validation split), "
                            "then N seeds each (the same seeds for all), test accuracy, and a "
                            "paired Wilcoxon test of each candidate against each baseline "
                            "(Holm-corrected, bootstrap intervals).",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("programs", nargs="+", metavar="PROGRAM_OR_RUN_DIR",
                   help="program text, a file holding one, or a run directory (its "
                        "summary.json's best program)")
    p.add_argument("--task", default="quick",
                   help=f"one of: {', '.join(compare_tasks.TASKS)}; or a built-in task or "
                        "FILE.py:CALLABLE returning an engine.tasks.SupervisedTask with a "
                        "'test' split (its metric fills the accuracy columns)")
    p.add_argument("--seeds", type=positive_int, default=5, help="training seeds per optimizer")
    p.add_argument("--trials", type=positive_int, default=15, help="tuning trials per optimizer")
    p.add_argument("--optimizers", default=",".join(BASELINES),
                   help="comma-separated baselines from kernels.zoo (also sgd, momentum, "
                        "adagrad, adabelief: each row costs its own tuning budget)")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default: runs/compare-<task>-<time>)")
    p.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                   help="parallel trainings (processes, one thread each); the table does not "
                        "depend on it")
    p.add_argument("--seed", type=int, default=0,
                   help="split seed, and root of the tuning-sampler and training seeds")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="override the task's epoch budget")
    p.add_argument("--lr-range", type=float, nargs=2, default=list(LR_RANGE),
                   metavar=("LOW", "HIGH"), help="log-uniform tuning range, for every optimizer")
    p.add_argument("--backend", choices=("auto", *backends.BACKENDS), default="auto",
                   help="kernel backend for every optimizer")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    try:
        task = compare_tasks.get_task(args.task)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.epochs is not None:
        task = dataclasses.replace(task, epochs=args.epochs)
    low, high = args.lr_range
    if not (0 < low < high and math.isfinite(high)):
        raise UsageError(f"--lr-range {low:g} {high:g}: need 0 < LOW < HIGH")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if args.backend != "auto" and not backends.get(args.backend).available("cpu"):
        raise UsageError(f"--backend {args.backend}: compare trains on the CPU, and the "
                         f"{args.backend} backend runs on {backends.get(args.backend).runs_on} "
                         f"there: {backends.get(args.backend).instead}")
    return Settings(task=task, seeds=args.seeds, trials=args.trials, seed=args.seed,
                    lr_range=(low, high), backend=args.backend)


def contenders_from(args: argparse.Namespace) -> list[Contender]:
    out: list[Contender] = []
    for arg in args.programs:
        new = candidate(*resolve_program(arg))
        if all(c.name != new.name for c in out):  # the same program twice is one row
            out.append(new)
    keys = [k.strip() for k in args.optimizers.split(",") if k.strip()]
    if not keys:
        raise UsageError("--optimizers is empty; name at least one baseline, e.g. adam")
    return out + [baseline_contender(k) for k in dict.fromkeys(keys)]


def _check_data(task: CompareTask, seed: int) -> None:
    from engine.tasks.data import DataCorruptError, DataNotFoundError

    try:
        compare_tasks.train_val(task, seed)
    except (DataNotFoundError, DataCorruptError, ValueError) as err:
        raise UsageError(' '.join(str(err).split())) from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
        settings = settings_from(args)
        contenders = contenders_from(args)
        _check_data(settings.task, settings.seed)
        out = args.out or Path("runs") / (f"compare-{settings.task.name}-"
                                          f"{datetime.now():%Y%m%d-%H%M%S}")
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} exists and is not a directory")
    except UsageError as err:
        print(f"engine.compare: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    from rich.console import Console

    err_console = Console(stderr=True)
    err_console.print(f"compare on {settings.task.name}: {len(contenders)} optimizers x "
                      f"({settings.trials} tuning trials + {settings.seeds} seeds), "
                      f"{args.workers} worker(s)")
    report = run_compare(contenders, settings, args.workers, log=err_console.print)
    report["command"] = shlex.join(["python", "-m", "engine.compare", *argv])
    report["created"] = datetime.now().astimezone().isoformat(timespec="seconds")
    paths = write_outputs(report, out)
    print_table(report)
    print(f"wrote {paths['markdown']}, {paths['json'].name}, {paths['plot'].name} "
          f"({report['seconds']['total']:.0f} s)")
    return 0
