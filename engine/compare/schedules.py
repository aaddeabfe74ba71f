"""`python -m engine.compare --mode dlr`: is a discovered learning-rate schedule better than plain
SGD with a tuned constant learning rate, or with a tuned cosine annealing one?

The protocol is the ALR comparison's (engine.compare.tuning: the same TPE budget per row, each
row its own sampler seed, the edge flag, N paired seeds, Wilcoxon + Holm + bootstrap intervals,
diverged runs counted at the floor, the test split read only by the final seeds); this module
supplies the rows and how each trains. Every row is plain `torch.optim.SGD` (no momentum, no
weight decay), so a difference in the table can only come from the schedule:

- the candidate: a `codegen.ir.Schedule` f(epoch, lr), run as the DLR fitness runs it
  (engine.modes `_Dlr.train`): its tuned number is a step factor s applied as
  `engine.modes.scaled_schedule` does (SGD starts at s times the task's initial lr, and every lr
  the schedule sets is s times its own, the schedule seeing lr / s). s ranges over the
  comparison's lr range divided by the task's initial lr, so the candidate's starting learning
  rates span the same range as the baselines' learning rates: the candidate `0.01` at factor s
  *is* SGD constant at lr 0.01 s, bit for bit (0.01 as the IR stores it, a float32).
- "SGD constant": SGD at the tuned lr, for every epoch.
- "SGD cosine": SGD from the tuned initial lr annealed as torch's CosineAnnealingLR with
  T_max = the task's epoch budget and eta_min = 0, stepped once per epoch: epoch k runs at
  initial * (1 + cos(pi k / epochs)) / 2 (its closed form). It is written as a schedule callable
  rather than a torch scheduler, so every row goes through the one epoch loop
  (engine.tasks.epochs sets every group's lr at the start of each epoch, the first included).

A preset task trains at its DLR protocol's batch size and epoch budget (the horizon its
schedules were evolved for: a schedule is a function of the epoch); a family has one budget for
both modes. `--epochs` overrides either.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from codegen.ir import ParseError, Schedule
from engine import modes
from engine.app.cli import UsageError
from engine.compare import tuning
from engine.compare.tuning import Contender, Settings
from engine.tasks import compare_tasks
from engine.tasks.compare_tasks import CompareTask

__all__ = ["CONSTANT", "COSINE", "ScheduleContender", "baselines", "candidate", "contenders",
           "cosine", "dlr_task", "initial_lr", "resolve_schedule", "run_compare"]

CONSTANT, COSINE = "SGD constant", "SGD cosine"
SGD = "torch.optim.SGD (momentum 0, weight decay 0)"

ScheduleFn = Callable[[int, float], float]


@dataclasses.dataclass(frozen=True)
class ScheduleContender(Contender):
    """One DLR row: SGD under a schedule. `kind` is "schedule" (the candidate: `program` is its
    text, the tuned value its step factor), "constant" or "cosine" (the tuned value SGD's lr,
    its initial lr for cosine). `initial_lr`: the task's, where the candidate's SGD starts at
    factor 1."""

    kind: str = "schedule"
    initial_lr: float = 0.01

    def training(self, value: float, task: CompareTask) -> tuple[
            Callable[[torch.nn.Module], torch.optim.Optimizer], ScheduleFn | None]:
        """The optimizer factory and the schedule of one run at tuned value `value`."""
        if self.kind == "schedule":
            start, schedule = value * self.initial_lr, \
                modes.scaled_schedule(Schedule.parse(self.program), value)
        elif self.kind == "constant":
            start, schedule = value, None
        elif self.kind == "cosine":
            start, schedule = value, cosine(value, task.epochs)
        else:
            raise ValueError(f"unknown schedule row kind {self.kind!r}")
        return (lambda model: torch.optim.SGD(model.parameters(), lr=start)), schedule


def cosine(initial: float, epochs: int) -> ScheduleFn:
    """CosineAnnealingLR(T_max=epochs, eta_min=0) stepped per epoch, as a schedule callable:
    epoch k's lr from `initial` alone (the lr it is passed is ignored)."""
    if not (epochs >= 1 and math.isfinite(initial) and initial > 0):
        raise ValueError(f"cosine needs epochs >= 1 and a positive initial lr, got {epochs}, "
                         f"{initial!r}")
    return lambda epoch, lr: initial * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def initial_lr(task: CompareTask) -> float:
    """The lr SGD starts at in the task's DLR protocol: a preset's DlrProtocol.initial_lr, a
    family's or user task's SupervisedTask.initial_lr."""
    if task.source == "preset":
        from engine.tasks.protocol import PRESETS

        return PRESETS[task.name].dlr.initial_lr
    if task.source == "supervised":
        return compare_tasks.supervised(task).initial_lr
    from engine.tasks.registry import family_module

    module = family_module(task.name)
    if module is None:
        raise ValueError(f"task {task.name!r}: no family to read its initial lr from")
    return module.task().initial_lr


def dlr_task(task: CompareTask) -> CompareTask:
    """`task` at its DLR budget: a preset's DLR protocol batch size and epochs; others as they
    are (a SupervisedTask has one budget for both modes)."""
    if task.source != "preset":
        return task
    from engine.tasks.protocol import PRESETS

    dlr = PRESETS[task.name].dlr
    return dataclasses.replace(task, batch_size=dlr.batch_size, epochs=dlr.max_epochs,
                               about=f"{task.about}; the preset's DLR batch size and epochs")


def resolve_schedule(arg: str) -> tuple[Schedule, str]:
    """A schedule from text, a file holding one, or a DLR run directory (its summary.json's
    best); returns it and where it came from, for the report."""
    path = Path(arg)
    text, source = arg, "text"
    if path.is_dir() or path.suffix == ".json":
        summary, best, mode = tuning.read_summary(arg, "schedule")
        if modes.find(mode) is not modes.DLR:
            raise UsageError(f"{summary}: the run's mode is {mode!r}, not 'dlr'; --mode dlr "
                             "compares schedules (drop --mode dlr for an optimizer)")
        text, source = best["program"], f"best schedule of {summary}"
        if isinstance(best.get("lr_scale"), (int, float)):
            source += (f", which scored best at step factor {best['lr_scale']:g} in the run "
                       "(tuned afresh here)")
    elif path.is_file():
        text, source = path.read_text(encoding="utf-8"), str(path)
    try:
        return Schedule.parse(text), source
    except (ParseError, ValueError, TypeError) as err:
        shown = arg if len(arg) < 60 else "the text"
        raise UsageError(f"cannot parse the schedule from {shown}: {' '.join(str(err).split())} "
                         "(a schedule is f(epoch, lr) on one line, like 'mul(lr, 0.9)', a file "
                         "holding one, or a DLR run directory)") from None


# -- the rows ---------------------------------------------------------------------------------

def candidate(schedule: Schedule, source: str, settings: Settings) -> ScheduleContender:
    """The row of a schedule under test, named by its hash; its step factor's range is the
    comparison's lr range over the task's initial lr (see the module docstring)."""
    start = initial_lr(settings.task)
    low, high = settings.lr_range
    return ScheduleContender(name=f"schedule {schedule.hash[:8]}", program=str(schedule),
                             role="candidate", tuned="step factor", source=source,
                             lr_range=(low / start, high / start), kind="schedule",
                             initial_lr=start)


def baselines(settings: Settings) -> list[ScheduleContender]:
    epochs = settings.task.epochs
    return [ScheduleContender(name=CONSTANT, program="lr", role="baseline", tuned="learning rate",
                              source=f"{SGD} at the tuned lr, constant", kind="constant"),
            ScheduleContender(name=COSINE, program=f"cosine over {epochs} epochs", role="baseline",
                              tuned="learning rate",
                              source=f"{SGD} from the tuned initial lr, annealed as "
                                     f"CosineAnnealingLR(T_max={epochs}, eta_min=0) stepped per "
                                     "epoch", kind="cosine")]


def contenders(args: Sequence[str], settings: Settings) -> list[ScheduleContender]:
    """The candidates `args` name (the same schedule twice is one row), then the baselines."""
    out: list[ScheduleContender] = []
    for arg in args:
        new = candidate(*resolve_schedule(arg), settings)
        if all(c.name != new.name for c in out):
            out.append(new)
    return out + baselines(settings)


def run_compare(rows: Sequence[ScheduleContender], settings: Settings, workers: int = 1,
                log: Callable[[str], None] = lambda line: None) -> dict:
    """engine.compare.tuning.run_compare on schedule rows, its report marked as DLR's: the mode,
    the task's initial lr, each row's tuning range and how the candidate's factor applies."""
    report = tuning.run_compare(rows, settings, workers, log)
    start = initial_lr(settings.task)
    report["mode"] = modes.DLR.name
    report["initial_lr"] = start
    for row, contender in zip(report["rows"], rows):
        row["lr_range"] = list(contender.lr_range or settings.lr_range)
        if contender.kind == "schedule":
            row["note"] = (f", by torch.optim.SGD from {start:g} x the tuned factor, every lr it "
                           "sets multiplied by the factor (the schedule sees lr / factor)")
    low, high = settings.lr_range
    report["mode_note"] = (
        f"Learning-rate schedules (DLR): every row is {SGD}, so only the schedule differs. "
        f"SGD constant tunes its lr, SGD cosine its initial lr (cosine annealing towards 0 over "
        f"the {settings.task.epochs} epochs, stepped per epoch); a candidate tunes a step factor "
        f"over [{low / start:g}, {high / start:g}] (the lr range over the task's initial lr "
        f"{start:g}): SGD starts at the factor x {start:g} and every lr the schedule sets is "
        "multiplied by it, so its starting lr spans the baselines' range.")
    return report
