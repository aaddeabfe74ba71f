"""What AutoLR evolves: an optimizer (ALR) or a learning-rate schedule (DLR).

Everything the two modes do differently lives here, one class per mode: how a candidate's text
is parsed, the grammar it is evolved in, the baseline it is measured against, the zoo seeds and
how a seed is snapped to a grammar, how a candidate is trained (its fitness), whether it is
compiled to a kernel and screened on probe inputs, what makes two candidates alike for the hall
of fame, and the standalone file a run exports. Other modules look a mode up (`get`) and call
it; none of them compares mode names.

The mode's name ("alr", "dlr") is what users type (``--mode``) and what a run's files store
(config.json, summary.json, the results store's protocol key): it never changes.

Import order: this module imports only ``codegen`` and ``engine.evolution.grammar`` at the top, so any
engine module can import it; the modules it dispatches to (seeds, tasks, screening, export,
kernels) import it back, so it imports them inside its methods, where they are used.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from codegen.ir import Program, Schedule, size as node_size
from engine.evolution.grammar import ALR_GRAMMAR, DLR_GRAMMAR

if TYPE_CHECKING:
    from engine.evolution.seeds import SeedProgram, _Snapper
    from engine.tasks.protocol import EvalResult, Task

__all__ = ["ALR", "DEFAULT", "DLR", "MODES", "Mode", "find", "get"]


class Mode:
    """One kind of candidate. The attributes are what a reader of a run sees differ; the
    methods are what the engine does differently."""

    name: str  # as typed and stored
    title: str  # as printed: "ALR"
    candidate: str  # what one candidate is, with its article: "an optimizer"
    programs: str  # what the grammar's phenotypes must be: "ALR programs"
    grammar: Path  # the default grammar (engine/evolution/grammars)
    compiled: bool  # candidates are compiled to a kernel: a cache, a backend, kernels/ files
    screened: bool  # candidates are screened and fingerprinted on probe inputs before training
    tiered: bool  # candidates can be scored by the fidelity-tier funnel (engine.fitness.funnel)
    min_over_trials: bool  # fitness is the minimum over several trials (one curve each)
    usage: tuple[str, ...]  # report.md's lines that use best_optimizer.py

    @property
    def evolves(self) -> str:
        """'an optimizer (ALR)': what a run evolves, for its report."""
        return f"{self.candidate} ({self.title})"

    def __repr__(self) -> str:
        return f"<mode {self.name}>"

    def __reduce__(self):
        # A job carries its Mode to a worker: it arrives as that process's own ALR or DLR.
        return get, (self.name,)

    def parse(self, text: str) -> Program | Schedule:
        raise NotImplementedError

    def size(self, text: str | Program | Schedule) -> int:
        """Nodes of the canonical program (its text, or the program itself when parsed
        already): what a reader has to understand."""
        raise NotImplementedError

    def _parsed(self, text: str | Program | Schedule) -> Program | Schedule:
        return self.parse(text) if isinstance(text, str) else text

    def baseline(self) -> tuple[str, str]:
        """(name, program text) of the reference each run is compared with, on the same
        protocol."""
        raise NotImplementedError

    def zoo_seeds(self) -> list[SeedProgram]:
        """The seeds a run starts from by default (``--seed-zoo``)."""
        raise NotImplementedError

    def snap_candidates(self, snapper: _Snapper, seed: SeedProgram) -> list[str]:
        """The seed's snapped texts to try deriving in the grammar, in order."""
        raise NotImplementedError

    def compile(self, program: Program | Schedule, backend: str) -> float:
        """Compile the candidate's kernel where it will train; the seconds it took."""
        return 0.0

    def train(self, task: Task, program: Program | Schedule, *, seed: int,
              time_limit: float | None, backend: str, lr_scale: float = 1.0) -> EvalResult:
        """The candidate's fitness under the task's protocol, with its compile seconds, at step
        size scale `lr_scale` (ALR: the optimizer's `lr`, which multiplies the weight update of
        a program that never reads it; DLR: every learning rate the schedule sets)."""
        raise NotImplementedError

    def behaviour(self, program: Program | Schedule, preset: str | None = None) -> str:
        """What a program does, as a key: two programs with the same key are one optimizer to
        a reader even when their texts differ (``square(grad)`` and ``mul(grad, grad)``)."""
        raise NotImplementedError

    def render(self, text: str, about: str, lr: float = 1.0) -> str:
        """The source of best_optimizer.py for ``text`` (engine.modes.export)."""
        raise NotImplementedError


class _Alr(Mode):
    name, title = "alr", "ALR"
    candidate, programs = "an optimizer", "ALR programs"
    grammar = ALR_GRAMMAR
    compiled = screened = min_over_trials = tiered = True
    usage = ("from best_optimizer import BestOptimizer",
             "optimizer = BestOptimizer(model.parameters())")

    def parse(self, text: str) -> Program:
        return Program.parse(text)

    def size(self, text: str | Program) -> int:
        canonical = self._parsed(text).canonical()
        return sum(node_size(e) for e in canonical.deltas().values() if e is not None)

    def baseline(self) -> tuple[str, str]:
        """Adam at lr=1e-3, lr written in as a constant: evaluated programs run at lr=1."""
        from engine.evolution.seeds import with_lr
        from kernels import zoo

        program = zoo.adam()
        fixed = Program(**{t: (None if e is None else with_lr(e, 1e-3))
                           for t, e in program.deltas().items()})
        return "Adam (lr=1e-3)", str(fixed)

    def zoo_seeds(self) -> list[SeedProgram]:
        """Adam, RMSprop, momentum, Adagrad, AdaBelief and Lion. Each snaps ``lr`` to the step
        size it is usually run with (torch's default for Adagrad; for Lion 3e-4, at the top of
        its paper's advice of a step 3-10x smaller than Adam's: the short budgets of a search
        reward the larger step)."""
        from engine.evolution.seeds import ADABELIEF_PAPER_OPS, ADAM_PAPER_OPS, LION_PAPER_OPS, SeedProgram
        from kernels import zoo  # the engine reaches kernels only where it needs a program

        return [SeedProgram("adam", ADAM_PAPER_OPS, 0.001, "zoo (Adam in the paper's ops)"),
                SeedProgram("rmsprop", str(zoo.rmsprop()), 0.001, "kernels.zoo.rmsprop()"),
                SeedProgram("momentum", str(zoo.momentum()), 0.01, "kernels.zoo.momentum()"),
                SeedProgram("adagrad", str(zoo.adagrad()), 0.01, "kernels.zoo.adagrad()"),
                SeedProgram("adabelief", ADABELIEF_PAPER_OPS, 0.001,
                            "zoo (AdaBelief in the paper's ops)"),
                SeedProgram("lion", LION_PAPER_OPS, 0.0003, "zoo (Lion in the paper's ops)")]

    def snap_candidates(self, snapper: _Snapper, seed: SeedProgram) -> list[str]:
        """``lr`` becomes the seed's constant; without and with ``state: 0.0`` lines, for
        grammars whose start rule needs all four states."""
        from engine.evolution.seeds import with_lr

        program = Program.parse(seed.text)
        snapped = {t: (None if e is None else snapper.alr(with_lr(e, seed.lr)))
                   for t, e in program.deltas().items()}
        return [snapper.program(snapped, fill=False), snapper.program(snapped, fill=True)]

    def compile(self, program: Program, backend: str) -> float:
        return self._compiled(program, backend)[1]

    @staticmethod
    def _compiled(program: Program, backend: str):
        """The program's kernel, compiled and warmed up, and the seconds that took."""
        import kernels  # the engine reaches kernels only in a worker

        start = time.perf_counter()
        kernel = kernels.compile(program, backend)
        kernel.warm_up()
        return kernel, time.perf_counter() - start

    def train(self, task: Task, program: Program, *, seed: int, time_limit: float | None,
              backend: str, lr_scale: float = 1.0) -> EvalResult:
        """The protocol's fitness; the program is lowered and compiled once, here, and every
        trial's optimizer runs that kernel (at `lr=lr_scale`)."""
        import dataclasses

        import kernels
        from engine.tasks.protocol import Task, alr_fitness

        kernel, compile_seconds = self._compiled(program, backend)
        if not isinstance(task, Task):  # a user task's TaskRef
            from engine.tasks.registry import supervised_fitness

            result = supervised_fitness(
                task, lambda model: kernels.EvolvedOptimizer(model.parameters(), program,
                                                             lr_scale, backend=backend,
                                                             kernel=kernel),
                seed=seed, time_limit=time_limit)
            return dataclasses.replace(result, compile_seconds=compile_seconds)
        result = alr_fitness(
            task, lambda params: kernels.EvolvedOptimizer(params, program, lr_scale,
                                                          backend=backend, kernel=kernel),
            seed=seed, time_limit=time_limit)
        return dataclasses.replace(result, compile_seconds=compile_seconds)

    def behaviour(self, program: Program | Schedule, preset: str | None = None) -> str:
        """The screening fingerprint: weight updates on fixed probe inputs."""
        from engine.fitness.screening import fingerprint

        return fingerprint(program)

    def render(self, text: str, about: str, lr: float = 1.0) -> str:
        from engine.modes.export import render_alr

        return render_alr(Program.parse(text), about, lr)


class _Dlr(Mode):
    name, title = "dlr", "DLR"
    candidate, programs = "a learning-rate schedule", "schedules"
    grammar = DLR_GRAMMAR
    compiled = screened = min_over_trials = tiered = False  # torch's SGD trains them, once
    usage = ("from best_optimizer import BestSchedule, INITIAL_LR",
             "optimizer = torch.optim.SGD(model.parameters(), lr=INITIAL_LR)",
             "scheduler = BestSchedule(optimizer)  # scheduler.step() after every epoch")

    def parse(self, text: str) -> Schedule:
        return Schedule.parse(text)

    def size(self, text: str | Schedule) -> int:
        return node_size(self._parsed(text).canonical().expr)

    def baseline(self) -> tuple[str, str]:
        """Plain SGD at 0.01: a constant schedule."""
        return "SGD, constant lr 0.01", "0.01"

    def zoo_seeds(self) -> list[SeedProgram]:
        """A constant and a step schedule."""
        from engine.evolution.seeds import SeedProgram

        return [SeedProgram("constant 0.01", "0.01", where="zoo"),
                SeedProgram("step decay", "if(epoch < 4, 0.05, 0.01)", where="zoo")]

    def snap_candidates(self, snapper: _Snapper, seed: SeedProgram) -> list[str]:
        """Constants compared with epoch snap to integers, the others to non-integers."""
        schedule = Schedule.parse(" ".join(seed.text.split()))
        return [snapper.render(snapper.schedule(schedule.expr))]

    def train(self, task: Task, program: Schedule, *, seed: int, time_limit: float | None,
              backend: str, lr_scale: float = 1.0) -> EvalResult:
        """SGD driven by the schedule; at `lr_scale` s every learning rate it sets is s times
        the schedule's, which itself sees the unscaled ones (`scaled_schedule`): so a constant
        schedule and one that decays its input both move with s, as a tuned SGD lr would."""
        import torch

        from engine.tasks.protocol import Task, dlr_fitness

        schedule = scaled_schedule(program, lr_scale)
        if not isinstance(task, Task):  # a user task's TaskRef: SGD at its initial_lr
            from engine.tasks.registry import supervised_fitness

            return supervised_fitness(
                task, lambda model, lr: torch.optim.SGD(model.parameters(), lr=lr * lr_scale),
                seed=seed, time_limit=time_limit, schedule=schedule)
        return dlr_fitness(task, schedule, seed=seed, time_limit=time_limit, lr_scale=lr_scale)

    def behaviour(self, program: Program | Schedule, preset: str | None = None) -> str:
        """The learning rates the schedule gives over the protocol's epochs."""
        from engine.tasks.protocol import DlrProtocol, get_task

        protocol = get_task(preset).dlr if preset is not None else DlrProtocol()
        lr, lrs = protocol.initial_lr, []
        for epoch in range(protocol.max_epochs):
            lr = program(epoch, lr)
            lrs.append(repr(lr))
            if not math.isfinite(lr):
                break  # training stops at a non-finite lr: nothing after it is behaviour
        return ",".join(lrs)

    def render(self, text: str, about: str, lr: float = 1.0) -> str:
        """``lr``: the step size scale of every learning rate the schedule sets
        (`scaled_schedule`)."""
        from engine.modes.export import render_dlr

        return render_dlr(Schedule.parse(text), about, lr)


def scaled_schedule(schedule: Schedule, scale: float):
    """`schedule` at step size scale `scale`: lr -> scale * schedule(epoch, lr / scale), so
    the initial lr and every value the schedule returns are `scale` times the unscaled run's
    (the schedule itself unchanged). The schedule itself at scale 1."""
    if scale == 1.0:
        return schedule
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"lr_scale must be a positive number, got {scale!r}")
    return lambda epoch, lr: scale * schedule(epoch, lr / scale)


ALR, DLR = _Alr(), _Dlr()
MODES: dict[str, Mode] = {m.name: m for m in (ALR, DLR)}
DEFAULT = ALR  # the mode of a run started without --mode


def get(mode: str | Mode) -> Mode:
    """The mode called ``mode`` (a Mode is returned as it is); ValueError for an unknown name."""
    if isinstance(mode, Mode):
        return mode
    found = find(mode)
    if found is None:
        raise ValueError(f"unknown mode {mode!r}; the modes are {', '.join(MODES)}")
    return found


def find(name: object) -> Mode | None:
    """The mode called ``name``, or None for anything else (a damaged file's value)."""
    return MODES.get(name) if isinstance(name, str) else None
