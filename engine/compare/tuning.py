"""`python -m engine.compare`: is an evolved optimizer better than tuned human ones, on this task?

A fair answer needs the same treatment for everyone, so every optimizer in the table goes through
the same steps:

1. Tune: every optimizer's step size by Optuna's TPE sampler with the same number of trials and
   the same log-uniform range for all: the optimizer's own ``lr``. For Adam, AdamW, Lion, RMSprop
   and Nesterov it is the learning rate; an evolved program (whose step size comes from its own
   evolved constants) never reads ``lr``, so EvolvedOptimizer scales its weight update by it, a
   global step factor; ADES and Sign, themselves evolved, read ``lr`` as that factor. AdamW and
   Lion, whose decoupled weight decay is part of the method, tune it too, within the same number
   of trials: log-uniform over its own range (``--wd-range``), sampled jointly with ``lr`` by
   multivariate TPE, since their product is the decay per step. The decay is EvolvedOptimizer's,
   decoupled as torch.optim.AdamW's (``p <- p * (1 - lr * wd)`` before the update; Lion's paper
   decays the same way); every other row has none. Each optimizer's sampler has its own seed,
   derived from the run seed and the optimizer's name (stable across runs): with one shared seed
   every row would try the same first values, and tuned values would repeat across rows by
   construction rather than by merit. A tuned value within 5% of the log-range of either end is
   flagged in the table: the best value may lie outside the range. Each trial trains once (a
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
4. Cost: the wall time of the tuning and of the seeds, and per row its step time and state
   memory against Adam's (`engine.compare.cost`).

Every optimizer runs as `kernels.EvolvedOptimizer` with a `kernels.zoo` program, the human ones
included (they reproduce torch.optim step for step; tests/test_zoo.py). One runtime for every row
means a difference in the table can only come from the update rule, not from two code paths.
With ``--mode dlr`` every row is torch.optim.SGD under a learning-rate schedule instead, by the
same steps (engine.compare.schedules).

Outputs (``--out``): compare.md, compare.json, curves.png (validation accuracy per epoch, mean
over seeds; and each trial's validation accuracy against its tuned value). User errors are one
line on stderr and exit status 2.
"""


from __future__ import annotations

import functools
import json
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from codegen.ir import ParseError, Program
from engine import modes
from engine.app.cli import UsageError
from engine.compare import cost, stats
from engine.compare.tables import summarise
from engine.tasks import compare_tasks
from engine.tasks.compare_tasks import CompareTask
from engine.tasks.protocol import FLOOR_FITNESS, derive_seed

__all__ = ["BASELINES", "LR_RANGE", "WD_RANGE", "Contender", "Settings", "baseline_contender",
           "candidate", "resolve_program", "run_compare", "sampler_seed"]

FORMAT, VERSION = "autolr-compare", 3  # 3: tuned weight decay, "costs"; 2: "comparisons"
# AdamW and Lion by default, next to Adam. Adagrad and AdaBelief are one `--optimizers` away
# rather than in every table: each row costs its own tuning budget (trials + seeds trainings), and
# neither adds a new kind of update to the default set (AdaBelief is Adam with a centred second
# moment, Adagrad RMSprop without forgetting).
BASELINES = ("adam", "adamw", "lion", "rmsprop", "nesterov", "ades", "sign")
# Baselines whose decoupled weight decay is tuned with their lr: key -> its zoo program.
WEIGHT_DECAY = {"adamw": "adam", "lion": "lion"}
LR_RANGE = (1e-5, 10.0)  # log-uniform, the same for every optimizer
WD_RANGE = (1e-5, 1e-1)  # log-uniform, for the rows that tune weight decay
NAMES = {"adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop", "nesterov": "Nesterov",
         "ades": "ADES", "sign": "Sign", "sgd": "SGD", "momentum": "Momentum", "lion": "Lion",
         "adagrad": "Adagrad", "adabelief": "AdaBelief"}
_TUNE, _FINAL, _SAMPLER = 11, 12, 13  # seed purposes (engine.compare.tables has 14)


# -- who competes -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Contender:
    """One row: a program run by EvolvedOptimizer whose runtime `lr` is the tuned value.

    `role` is "candidate" (what is being tested) or "baseline"; `tuned` says what `lr` means;
    `tune_decay`: its weight decay is tuned with `lr` (AdamW, Lion), else it has none.
    """

    name: str
    program: str
    role: str
    tuned: str  # "learning rate" or "step factor"
    source: str = ""  # where it came from: a run summary, a file, "text", a zoo call
    tune_decay: bool = False
    lr_range: tuple[float, float] | None = None  # its own tuning range; None: Settings.lr_range


def candidate(program: Program, source: str = "text") -> Contender:
    """The row of a program under test: named by its hash. Its tuned `lr` is a step factor:
    EvolvedOptimizer scales the weight update of a program that never reads `lr` by it."""
    return Contender(name=f"evolved {program.hash[:8]}", program=str(program),
                     role="candidate", tuned="step factor", source=source)


def baseline_contender(key: str) -> Contender:
    from kernels import zoo

    zoo_key = WEIGHT_DECAY.get(key, key)
    if zoo_key not in zoo.ZOO:
        raise UsageError(f"unknown optimizer {key!r}; choose from: "
                         f"{', '.join([*zoo.ZOO, *WEIGHT_DECAY])}")
    human = zoo_key in ("sgd", "momentum", "nesterov", "rmsprop", "adam", "lion", "adagrad",
                        "adabelief")
    source = f"kernels.zoo.{zoo_key}() (its defaults for the other settings)" if human else \
        f"kernels.zoo.{zoo_key}() (its constants as evolved)"
    if key in WEIGHT_DECAY:
        source = (f"kernels.zoo.{zoo_key}() with decoupled weight decay (tuned with lr, as "
                  "torch.optim.AdamW's), its defaults for the rest")
    return Contender(name=NAMES.get(key, key), program=str(zoo.ZOO[zoo_key]()), role="baseline",
                     tuned="learning rate" if human else "step factor", source=source,
                     tune_decay=key in WEIGHT_DECAY)


def read_summary(arg: str, what: str) -> tuple[Path, dict, object]:
    """The summary.json of run directory `arg` (or `arg` itself, a .json file): its path, its
    "best" entry (which has a "program") and its mode; a UsageError where there is none. `what`
    the run's best is ("program", "schedule"), for the message."""
    path = Path(arg)
    summary = path / "summary.json" if path.is_dir() else path
    if not summary.is_file():
        raise UsageError(f"{arg}: no summary.json there; pass a finished run directory "
                         f"(engine.run writes summary.json at the end), a {what} file or "
                         f"{what} text")
    try:
        data = json.loads(summary.read_text(encoding="utf-8"))
        best, mode = data["best"], data.get("mode", modes.DEFAULT.name)
        if not isinstance(best["program"], str):
            raise TypeError(f"best.program is {type(best['program']).__name__}, not text")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"{summary}: not a run summary with a best {what} ({err})") from None
    return summary, best, mode


def resolve_program(arg: str) -> tuple[Program, str]:
    """A program from text, a file holding one, or a run directory (its summary.json's best).

    Returns the program and where it came from, for the report."""
    path = Path(arg)
    source = "text"
    if path.is_dir() or path.suffix == ".json":
        summary, best, mode = read_summary(arg, "program")
        text = best["program"]
        kind = modes.find(mode)
        if kind is None or not kind.compiled:
            what = kind.candidate if kind else "an unknown mode"
            raise UsageError(f"{summary}: a {str(mode).upper()} run ({what}); compare takes "
                             "ALR optimizers (--mode dlr: schedules)")
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
    wd_range: tuple[float, float] = WD_RANGE
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
    weight_decay: float = 0.0


def _train(settings: Settings, contender: Contender, lr: float, init_seed: int, fit_seed: int,
           weight_decay: float = 0.0):
    """One training run on the train split, validated on the validation split. No test data."""
    from engine.tasks.training import fit
    from kernels import EvolvedOptimizer

    task = settings.task
    splits = compare_tasks.train_val(task, settings.seed)

    def optimizer_for(model):
        return EvolvedOptimizer(model.parameters(), contender.program, lr,
                                weight_decay=weight_decay, backend=settings.backend)

    from engine.compare.schedules import ScheduleContender

    schedule = None
    if isinstance(contender, ScheduleContender):  # --mode dlr: torch's SGD under a schedule
        optimizer_for, schedule = contender.training(lr, task)

    if task.source == "supervised":  # a SupervisedTask: its loss, its metric as "val_acc"
        from engine.tasks.supervised import Loaded, fit_supervised

        data = Loaded(splits.train, splits.val, None)
        return fit_supervised(compare_tasks.supervised(task), data,
                              optimizer_for, init_seed=init_seed, shuffle_seed=fit_seed,
                              epochs=task.epochs, patience=task.epochs, schedule=schedule)
    model = task.build_model(init_seed)
    optimizer = optimizer_for(model)
    result = fit(model, optimizer, splits.train, splits.val, seed=fit_seed,
                 batch_size=task.batch_size, max_epochs=task.epochs, patience=task.epochs,
                 monitor="val_acc", eval_batch=task.eval_batch, schedule=schedule)
    return model, result


def tune(job: TuneJob) -> dict:
    """TPE over the contender's `lr` (and weight decay where it tunes it); each trial's score
    is its best validation accuracy."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s, decay = job.settings, job.contender.tune_decay
    start = time.perf_counter()
    seed = sampler_seed(s, job.contender.name)
    with warnings.catch_warnings():  # multivariate TPE is "experimental" in Optuna's words
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # An lr-only study stays univariate: the same draws as every table before.
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=s.startup_trials,
                                             multivariate=decay)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    span = job.contender.lr_range or s.lr_range
    trials = []
    for _ in range(s.trials):
        trial = study.ask()
        lr = trial.suggest_float("lr", *span, log=True)
        wd = trial.suggest_float("weight_decay", *s.wd_range, log=True) if decay else 0.0
        _, result = _train(s, job.contender, lr, _seed(s, _TUNE, 0), _seed(s, _TUNE, 1), wd)
        value = FLOOR_FITNESS if result.reason else max(result.val_acc, default=FLOOR_FITNESS)
        study.tell(trial, value)
        trials.append({"lr": lr, **({"weight_decay": wd} if decay else {}), "val_acc": value,
                       "reason": result.reason})
    best = max(range(len(trials)), key=lambda i: (trials[i]["val_acc"], -i))
    lr = trials[best]["lr"]
    wd = trials[best]["weight_decay"] if decay else None
    edge = {"lr": stats.at_edge(lr, *span)}
    if decay:
        edge["weight decay"] = stats.at_edge(wd, *s.wd_range)
    return {"lr": lr, "weight_decay": wd, "best_val": trials[best]["val_acc"], "trials": trials,
            "diverged": sum(t["reason"] is not None for t in trials), "sampler_seed": seed,
            "edge": edge, "seconds": time.perf_counter() - start}


def train_seed(job: SeedJob) -> dict:
    """Seed `index` on the tuned value; the test split is read here and only here."""
    from engine.tasks.training import loss_accuracy

    s = job.settings
    start = time.perf_counter()
    model, result = _train(s, job.contender, job.lr, _seed(s, _FINAL, 2 * job.index),
                           _seed(s, _FINAL, 2 * job.index + 1), job.weight_decay)
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
    from engine.exec import make_executor
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
             "source": c.source, "weight_decay": None, "failed": None,
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
            row["weight_decay"] = outcome.value["weight_decay"]
            wd = "" if row["weight_decay"] is None else f", weight decay {row['weight_decay']:.3g}"
            log(f"tuned {row['name']}: {row['tuned']} {row['lr']:.3g}{wd}, best validation "
                f"{outcome.value['best_val']:.4f} ({outcome.value['diverged']} of "
                f"{settings.trials} trials diverged) in {outcome.value['seconds']:.0f} s")
        tuned_at = time.perf_counter()
        jobs = [SeedJob(settings, c, rows[i]["lr"], k, rows[i]["weight_decay"] or 0.0)
                for i, c in enumerate(contenders)
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
    costs = _costs(contenders, rows, settings, log)
    task = settings.task
    report = {
        "format": FORMAT, "version": VERSION,
        "task": {"name": task.name, "about": task.about, "epochs": task.epochs,
                 "batch_size": task.batch_size, "model": repr(task.model)},
        "seeds": settings.seeds, "trials": settings.trials, "seed": settings.seed,
        "lr_range": list(settings.lr_range), "wd_range": list(settings.wd_range),
        "backend": settings.backend,
        "sampler": {"name": "optuna TPESampler", "n_startup_trials": settings.startup_trials,
                    "seeds": {c.name: sampler_seed(settings, c.name) for c in contenders}},
        "rows": rows,
        "seconds": {"tuning": tuned_at - start, "seeds": end - tuned_at, "total": end - start},
        "costs": costs,
        "workers": workers,
    }
    summarise(report)
    return report


def _costs(contenders: Sequence[Contender], rows: list[dict], settings: Settings,
           log: Callable[[str], None]) -> dict[str, dict]:
    """Each row's step time and state memory (`engine.compare.cost`) at its tuned values, in
    this process after every training, so that no training competes with the timing."""
    from engine.compare.schedules import ScheduleContender
    from kernels import zoo

    if any(isinstance(c, ScheduleContender) for c in contenders):
        return {}  # --mode dlr: every row is the same plain SGD, only its lrs differ

    def measure(program: str, lr: float, wd: float) -> dict:
        try:
            return cost.measure(settings.task, program, lr, wd, settings.backend, settings.seed)
        except Exception as err:  # noqa: BLE001 - a row that crashes is reported, as in tuning
            return cost.failed(f"{type(err).__name__}: {err}")

    found = {c.name: measure(c.program, row["lr"] or 1e-3, row["weight_decay"] or 0.0)
             for c, row in zip(contenders, rows)}
    out = cost.with_ratios(found, lambda: measure(str(zoo.adam()), 1e-3, 0.0))
    for name, c in out.items():
        log(f"cost of {name}: failed ({c['error']})" if c.get("error") else
            f"cost of {name}: step {c['step_seconds'] * 1e3:.3g} ms, "
            f"{c['bytes_per_param']:g} bytes of state per parameter")
    return out
