"""`python -m engine.compare`'s command line: arguments to Settings and contenders, then run,
write and print (engine.compare.tuning says what a comparison does)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import sys
from datetime import datetime
from pathlib import Path

from codegen import backends
from engine import modes
from engine.app.cli import Parser, UsageError, positive_int
from engine.compare import schedules
from engine.compare.tables import print_table, write_outputs
from engine.compare.tuning import (
    BASELINES, LR_RANGE, WD_RANGE, Contender, Settings, baseline_contender, candidate,
    resolve_program, run_compare)
from engine.tasks import compare_tasks
from engine.tasks.compare_tasks import CompareTask


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m engine.compare",
                description="Compare an evolved optimizer with tuned Adam, Lion, RMSprop, "
                            "Nesterov, ADES and Sign: the same tuning budget for each (TPE over a "
                            "log-scale learning rate / step factor, with weight decay for AdamW "
                            "and Lion, on the validation split), "
                            "then N seeds each (the same seeds for all), test accuracy, and a "
                            "paired Wilcoxon test of each candidate against each baseline "
                            "(Holm-corrected, bootstrap intervals).",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("programs", nargs="+", metavar="PROGRAM_OR_RUN_DIR",
                   help="program text, a file holding one, or a run directory (its "
                        "summary.json's best program); with --mode dlr a schedule f(epoch, lr) "
                        "such as 'mul(lr, 0.9)', a file holding one, or a DLR run directory")
    p.add_argument("--mode", choices=tuple(modes.MODES), default=modes.ALR.name,
                   help="alr: optimizers against the --optimizers baselines; dlr: learning-rate "
                        "schedules against plain SGD at a tuned constant lr and a tuned cosine "
                        "schedule (engine.compare.schedules)")
    p.add_argument("--task", default="quick",
                   help=f"one of: {', '.join(compare_tasks.names())}; or "
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
    p.add_argument("--wd-range", type=float, nargs=2, default=list(WD_RANGE),
                   metavar=("LOW", "HIGH"),
                   help="log-uniform range of the decoupled weight decay that AdamW and Lion "
                        "tune together with their learning rate")
    p.add_argument("--backend", choices=("auto", *backends.BACKENDS), default="auto",
                   help="kernel backend for every optimizer")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    try:
        task = compare_tasks.get_task(args.task)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.mode == modes.DLR.name:
        task = schedules.dlr_task(task)
    if args.epochs is not None:
        task = dataclasses.replace(task, epochs=args.epochs)
    low, high = args.lr_range
    if not (0 < low < high and math.isfinite(high)):
        raise UsageError(f"--lr-range {low:g} {high:g}: need 0 < LOW < HIGH")
    wd_low, wd_high = args.wd_range
    # lr * wd >= 1 would zero or flip every weight each step: no range reaches there sensibly.
    if not (0 < wd_low < wd_high < 1):
        raise UsageError(f"--wd-range {wd_low:g} {wd_high:g}: need 0 < LOW < HIGH < 1")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if args.backend != "auto" and not backends.get(args.backend).available("cpu"):
        raise UsageError(f"--backend {args.backend}: compare trains on the CPU, and the "
                         f"{args.backend} backend runs on {backends.get(args.backend).runs_on} "
                         f"there: {backends.get(args.backend).instead}")
    return Settings(task=task, seeds=args.seeds, trials=args.trials, seed=args.seed,
                    lr_range=(low, high), wd_range=(wd_low, wd_high), backend=args.backend)


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
        dlr = args.mode == modes.DLR.name
        if dlr and args.optimizers != ",".join(BASELINES):
            raise UsageError("--optimizers names ALR baselines; --mode dlr always compares with "
                             f"{schedules.CONSTANT} and {schedules.COSINE}")
        contenders = schedules.contenders(args.programs, settings) if dlr else \
            contenders_from(args)
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
    run = schedules.run_compare if dlr else run_compare
    report = run(contenders, settings, args.workers, log=err_console.print)
    report.setdefault("mode", args.mode)
    report["command"] = shlex.join(["python", "-m", "engine.compare", *argv])
    report["created"] = datetime.now().astimezone().isoformat(timespec="seconds")
    paths = write_outputs(report, out)
    print_table(report)
    print(f"wrote {paths['markdown']}, {paths['json'].name}, {paths['plot'].name} "
          f"({report['seconds']['total']:.0f} s)")
    return 0
