"""Fitness of a batch of candidates: the pipeline that decides which ones must train.

Per candidate, cheapest answer first:
  parse -> hash -> store (answered before, this run or an earlier one)
        -> screening (broken without training: no grad in the weight update, NaN/inf or zero
           updates on probe inputs)
        -> fingerprint (behaves identically on probe inputs to one already answered)
        -> training on the executor (the only expensive step) -> store.
`Evaluator.evaluate` is the two halves in turn: `answer_cheaply` (everything up to the
fingerprint) and `train` (the executor and the store writes); what passes between them is a
`Batch`, whose `pending` candidates are the ones still to train.
Any failure -- a parse error, an exception, NaN, a hang past the time limit, a dead worker -- gets
the floor fitness and a recorded reason, and the run goes on. Only the candidate's own failures
(screened, diverged) are stored for later runs; an exception, a hang or a dead worker says more
about the machine or AutoLR (`engine.fitness.store.not_reusable`) and is tried again next run.
"""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Sequence

from typing import TYPE_CHECKING

from codegen.ir import ParseError, Program, Schedule
from engine.exec import Executor, Outcome
from engine.fitness.screening import fingerprint, probe_updates, screen
from engine.fitness.store import Record, Store, not_reusable
from engine.tasks.protocol import FLOOR_FITNESS, EvalResult, Task, get_task
from engine.tasks.registry import TaskRef

if TYPE_CHECKING:  # the modes build on this package (engine.modes -> engine.fitness)
    from engine.modes import Mode

# Hard kill for a worker that stops answering: the in-training deadline should fire first.
KILL_GRACE = 1.5


@dataclass(frozen=True)
class Job:
    """One training, as sent to a worker. It carries the Mode, the parsed program and the Task
    themselves, so a worker neither parses text nor looks a name up; they are frozen dataclasses
    of small trees and numbers (a Mode pickles as its name), so the job pickles in a few KB, the
    same way each time."""

    mode: Mode
    program: Program | Schedule
    task: Task | TaskRef  # a preset's Task, or a user task's reference (resolved in the worker)
    seed: int
    time_limit: float | None
    backend: str
    lr_scale: float = 1.0  # the step size scale it trains at (Mode.train)

    @classmethod
    def build(cls, mode: Mode, text: str, preset: str, seed: int,
              time_limit: float | None, backend: str) -> Job:
        """The job for a candidate given as text, on the preset called `preset`."""
        return cls(_checked(mode), mode.parse(text), get_task(preset), seed, time_limit, backend)


@dataclass(frozen=True)
class Evaluation:
    """The answer for one candidate text, and how it was obtained."""

    text: str
    hash: str | None
    fitness: float
    source: str  # trained | store | screened | fingerprint | failed
    reason: str | None = None
    accuracies: tuple[float, ...] = ()
    seconds: float = 0.0
    compile_seconds: float = 0.0
    curves: dict = field(default_factory=dict, compare=False, repr=False)


def train(job: Job) -> EvalResult:
    """Worker entry point: compile the candidate's kernel (ALR), then train it under the
    protocol."""
    return job.mode.train(job.task, job.program, seed=job.seed, time_limit=job.time_limit,
                          backend=job.backend, lr_scale=job.lr_scale)


def compile_kernel(job: Job) -> float:
    """Worker entry point of a run's pre-flight check: compile the job's kernel where
    candidates will train, without training; the seconds it took."""
    return job.mode.compile(job.program, job.backend)


def _checked(mode: Mode) -> Mode:
    """`mode` itself; a TypeError for a mode's name, which callers turn into the object with
    engine.modes.get (this package sits below engine.modes and does not look names up)."""
    if isinstance(mode, str) or not hasattr(mode, "parse"):
        raise TypeError(f"mode must be an engine.modes Mode (engine.modes.get({mode!r})), not "
                        f"{type(mode).__name__}")
    return mode


@dataclass
class Pending:
    """A candidate that must train: its program, its fingerprint (None where the mode does not
    screen), and the batch indices its one training answers."""

    program: Program | Schedule
    fingerprint: str | None
    indices: list[int]


@dataclass
class Batch:
    """One `evaluate` call between its halves: the answers so far, by index, and what is still
    to train, by program hash (in first-seen order)."""

    texts: Sequence[str]
    on_result: Callable[[Evaluation], object] | None = None
    answers: dict[int, Evaluation] = field(default_factory=dict)
    pending: dict[str, Pending] = field(default_factory=dict)
    by_fingerprint: dict[str, str] = field(default_factory=dict)  # -> hash training in this batch

    def results(self) -> list[Evaluation]:
        return [self.answers[i] for i in range(len(self.texts))]


class Evaluator:
    """Evaluates batches of candidate texts for one (mode, task, seed); keeps counts by source."""

    def __init__(self, mode: Mode, task: str | Task | TaskRef, seed: int, store: Store,
                 executor: Executor, *,
                 time_limit: float | None = None, backend: str = "numba", run: str | None = None,
                 worker: Callable[[Job], EvalResult] = train, lr_scale: float = 1.0):
        """`task`: a preset's name, or a user task's checked TaskRef. `worker` runs one Job in
        an executor's worker (module-level, so it pickles); tests substitute one that
        misbehaves on purpose. `lr_scale`: every candidate trains at this step size scale
        (Mode.train); the store keeps each scale's answers apart."""
        if isinstance(task, TaskRef):
            self.definition: Task | TaskRef = task
            name = task.name
        else:  # a preset's name (an unknown one fails here, before any work), or its Task
            self.definition = task if isinstance(task, Task) else get_task(task)
            name = self.definition.name
        self.mode, self.task, self.seed = _checked(mode), name, seed
        # The store's protocol key names the task's digest too: the store must not answer from
        # a task's older definition (a preset's, or a user task file's before an edit).
        self.protocol = f"{self.mode.name}/{name}@{self.definition.digest}"
        if lr_scale != 1.0:  # scale 1 keeps the key every earlier run stored under
            self.protocol += f"@lr{float(lr_scale)!r}"
        self.lr_scale = float(lr_scale)
        self.store, self.executor = store, executor
        self.time_limit, self.backend, self.run = time_limit, backend, run
        self.worker = worker
        self.counts: collections.Counter[str] = collections.Counter()
        self.failures: collections.Counter[str] = collections.Counter()

    def evaluate(self, texts: Sequence[str], on_result=None) -> list[Evaluation]:
        """Fitness of every text, in order. `on_result(evaluation)` is called as answers arrive."""
        batch = self.answer_cheaply(texts, on_result)
        self.train(batch)
        return batch.results()

    def job(self, program: Program | Schedule) -> Job:
        """The training job for `program` under this evaluator's mode, task and seed."""
        return Job(self.mode, program, self.definition, self.seed, self.time_limit,
                   self.backend, self.lr_scale)

    # -- the cheap half ------------------------------------------------------------------------

    def answer_cheaply(self, texts: Sequence[str], on_result=None) -> Batch:
        """Answer every text that needs no training: a parse error, the store (this program or,
        for a screened mode, a behavioural twin), or screening. The rest end up in the batch's
        `pending`, one entry per program hash (and per fingerprint within the batch), each with
        the indices its training will answer."""
        batch = Batch(texts, on_result)
        for i, text in enumerate(texts):
            try:
                program = self.mode.parse(text)
            except ParseError as exc:
                self._answer(batch, i, Evaluation(text, None, FLOOR_FITNESS, "failed",
                                                  f"parse error: {exc}"))
                continue
            h = program.hash
            if h in batch.pending:
                batch.pending[h].indices.append(i)
                continue
            known = self.store.lookup(h, self.task, self.protocol, self.seed)
            if known is not None:
                self._answer(batch, i, self._from_record(text, known, "store"))
                continue
            fp = None
            if self.mode.screened:
                fp = self._screen(batch, i, text, program)
                if fp is None:
                    continue
            batch.pending[h] = Pending(program, fp, [i])
        return batch

    def _screen(self, batch: Batch, i: int, text: str, program: Program) -> str | None:
        """Screening and the fingerprint for candidate `i`: None when that answered it (or
        joined it to a twin already pending in this batch), else its fingerprint."""
        h = program.hash
        verdict = screen(program, probe_updates(program))
        if verdict is not None:
            evaluation = Evaluation(text, h, FLOOR_FITNESS, "screened", verdict)
            self._put(evaluation, program, None)
            self._answer(batch, i, evaluation)
            return None
        fp = fingerprint(program)
        twin = self.store.lookup_fingerprint(fp, self.task, self.protocol, self.seed)
        if twin is not None:
            evaluation = self._from_record(text, twin, "fingerprint", h)
            self._put(evaluation, program, fp)
            self._answer(batch, i, evaluation)
            return None
        if fp in batch.by_fingerprint:
            batch.pending[batch.by_fingerprint[fp]].indices.append(i)
            return None
        batch.by_fingerprint[fp] = h
        return fp

    # -- the training half ---------------------------------------------------------------------

    def train(self, batch: Batch) -> None:
        """Train every pending program of `batch` on the executor, one job per program, and
        answer all the indices each one stands for as its outcome arrives. What a training says
        about the candidate itself is stored; a machine's failure (`not_reusable`) is not."""
        train_batches(self.executor, [(self, batch)])

    def _trained(self, batch: Batch, h: str, outcome: Outcome[EvalResult]) -> None:
        """Answer, and store, every index that program `h`'s training stands for."""
        pending = batch.pending[h]
        program, fp = pending.program, pending.fingerprint
        texts = batch.texts
        if outcome.ok:
            result = outcome.value
            trained = Evaluation(str(program), h, float(result.fitness), "trained", result.reason,
                                 result.accuracies, result.seconds, result.compile_seconds,
                                 result.curves)
        else:
            trained = Evaluation(str(program), h, FLOOR_FITNESS, "trained", outcome.reason)
        if not not_reusable(trained.reason):
            self._put(trained, program, fp)
        first, *others = pending.indices
        self._answer(batch, first, dataclasses.replace(trained, text=texts[first]))
        for i in others:
            twin = self.mode.parse(texts[i])
            if twin.hash == h:
                self._answer(batch, i, Evaluation(texts[i], h, trained.fitness, "store",
                                                  trained.reason, trained.accuracies))
                continue
            evaluation = Evaluation(texts[i], twin.hash, trained.fitness, "fingerprint",
                                    trained.reason, trained.accuracies)
            if not not_reusable(trained.reason):
                self._put(evaluation, twin, fp)
            self._answer(batch, i, evaluation)

    # -- both halves ---------------------------------------------------------------------------

    def _answer(self, batch: Batch, i: int, evaluation: Evaluation) -> None:
        batch.answers[i] = evaluation
        self.counts[evaluation.source] += 1
        self.counts["requested"] += 1
        if evaluation.reason:
            self.failures[evaluation.reason.split(":")[0]] += 1
        if batch.on_result:
            batch.on_result(evaluation)

    def _from_record(self, text: str, record: Record, source: str, h: str | None = None) -> Evaluation:
        return Evaluation(text, h or record.hash, record.fitness, source, record.reason,
                          record.accuracies)

    def _put(self, evaluation: Evaluation, program, fp: str | None) -> None:
        source = "trained" if evaluation.source == "trained" else evaluation.source
        self.store.put(Record(
            hash=evaluation.hash, task=self.task, protocol=self.protocol, seed=self.seed,
            fitness=evaluation.fitness, source=source, program=str(program), fingerprint=fp,
            accuracies=evaluation.accuracies, reason=evaluation.reason, seconds=evaluation.seconds,
            compile_seconds=evaluation.compile_seconds, run=self.run))


def train_batches(executor: Executor, work: Sequence[tuple[Evaluator, Batch]]) -> None:
    """`Evaluator.train` for several (evaluator, batch) pairs in one executor call: evaluators
    of other tasks, step size scales or seeds (the funnel's trained tiers) keep every worker
    busy instead of waiting on the slowest training of each pair in turn."""
    jobs, where = [], []
    for evaluator, batch in work:
        for h, pending in batch.pending.items():
            jobs.append(evaluator.job(pending.program))
            where.append((evaluator, batch, h))
    if not jobs:
        return
    limits = [e.time_limit for e, _ in work]
    timeout = None if None in limits else max(limits) * KILL_GRACE + 30
    worker = work[0][0].worker
    for index, outcome in executor.run(worker, jobs, timeout=timeout):
        evaluator, batch, h = where[index]
        evaluator._trained(batch, h, outcome)
