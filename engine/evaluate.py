"""Fitness of a batch of candidates: the pipeline that decides which ones must train.

Per candidate, cheapest answer first:
  parse -> hash -> store (answered before, this run or an earlier one)
        -> screening (broken without training: no grad in the weight update, NaN/inf or zero
           updates on probe inputs)
        -> fingerprint (behaves identically on probe inputs to one already answered)
        -> training on the executor (the only expensive step) -> store.
Any failure -- a parse error, an exception, NaN, a hang past the time limit, a dead worker -- gets
the floor fitness and a recorded reason, and the run goes on. Only the candidate's own failures
(screened, diverged) are stored for later runs; an exception, a hang or a dead worker says more
about the machine or AutoLR (`engine.store.not_reusable`) and is tried again next run.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Callable, Sequence

from codegen.ir import ParseError
from engine import modes
from engine.executors import Executor
from engine.modes import Mode
from engine.screening import fingerprint, probe_updates, screen
from engine.store import Record, Store, not_reusable
from engine.tasks import FLOOR_FITNESS, get_task

# Hard kill for a worker that stops answering: the in-training deadline should fire first.
KILL_GRACE = 1.5


@dataclass(frozen=True)
class Job:
    """One training, as sent to a worker (picklable, small)."""

    mode: str  # an engine.modes name
    text: str
    task: str
    seed: int
    time_limit: float | None
    backend: str


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


def train(job: Job) -> dict:
    """Worker entry point: compile the candidate's kernel (ALR), then train it under the
    protocol."""
    result, compile_seconds = modes.get(job.mode).train(
        get_task(job.task), job.text, seed=job.seed, time_limit=job.time_limit,
        backend=job.backend)
    return {"fitness": result.fitness, "reason": result.reason, "accuracies": result.accuracies,
            "seconds": result.seconds, "compile_seconds": compile_seconds,
            "curves": {"train_loss": result.train_loss, "val_acc": result.val_acc}}


def compile_kernel(job: Job) -> float:
    """Worker entry point of a run's pre-flight check: compile the job's kernel where
    candidates will train, without training; the seconds it took."""
    return modes.get(job.mode).compile(job.text, job.backend)


class Evaluator:
    """Evaluates batches of candidate texts for one (mode, task, seed); keeps counts by source."""

    def __init__(self, mode: str | Mode, task: str, seed: int, store: Store, executor: Executor, *,
                 time_limit: float | None = None, backend: str = "numba", run: str | None = None,
                 worker: Callable[[Job], dict] = train):
        """`worker` runs one Job in an executor's worker (module-level, so it pickles); tests
        substitute one that misbehaves on purpose."""
        definition = get_task(task)  # an unknown preset fails here, before any work
        self.mode, self.task, self.seed = modes.get(mode), task, seed
        # The store's protocol key names the task's digest too: the store must not answer from
        # a preset's older definition.
        self.protocol = f"{self.mode.name}/{task}@{definition.digest}"
        self.store, self.executor = store, executor
        self.time_limit, self.backend, self.run = time_limit, backend, run
        self.worker = worker
        self.counts: collections.Counter[str] = collections.Counter()
        self.failures: collections.Counter[str] = collections.Counter()

    def evaluate(self, texts: Sequence[str], on_result=None) -> list[Evaluation]:
        """Fitness of every text, in order. `on_result(evaluation)` is called as answers arrive."""
        answers: dict[int, Evaluation] = {}
        to_train: dict[str, list[int]] = {}  # hash -> indices waiting for that training
        by_fingerprint: dict[str, str] = {}  # fingerprint -> hash being trained in this batch
        parsed = {}

        def answer(i: int, evaluation: Evaluation) -> None:
            answers[i] = evaluation
            self.counts[evaluation.source] += 1
            self.counts["requested"] += 1
            if evaluation.reason:
                self.failures[evaluation.reason.split(":")[0]] += 1
            if on_result:
                on_result(evaluation)

        for i, text in enumerate(texts):
            try:
                program = self.mode.parse(text)
            except ParseError as exc:
                answer(i, Evaluation(text, None, FLOOR_FITNESS, "failed", f"parse error: {exc}"))
                continue
            h = program.hash
            if h in to_train:
                to_train[h].append(i)
                continue
            known = self.store.lookup(h, self.task, self.protocol, self.seed)
            if known is not None:
                answer(i, self._from_record(text, known, "store"))
                continue
            fp = None
            if self.mode.screened:
                updates = probe_updates(program)
                verdict = screen(program, updates)
                if verdict is not None:
                    evaluation = Evaluation(text, h, FLOOR_FITNESS, "screened", verdict)
                    self._put(evaluation, program, None)
                    answer(i, evaluation)
                    continue
                fp = fingerprint(program)
                twin = self.store.lookup_fingerprint(fp, self.task, self.protocol, self.seed)
                if twin is not None:
                    evaluation = self._from_record(text, twin, "fingerprint", h)
                    self._put(evaluation, program, fp)
                    answer(i, evaluation)
                    continue
                if fp in by_fingerprint:
                    to_train[by_fingerprint[fp]].append(i)
                    continue
                by_fingerprint[fp] = h
            parsed[h] = (program, fp)
            to_train[h] = [i]

        hashes = list(to_train)
        jobs = [Job(self.mode.name, str(parsed[h][0]), self.task, self.seed, self.time_limit,
                    self.backend) for h in hashes]
        timeout = None if self.time_limit is None else self.time_limit * KILL_GRACE + 30
        for index, outcome in self.executor.run(self.worker, jobs, timeout=timeout):
            h = hashes[index]
            program, fp = parsed[h]
            if outcome.ok:
                value = outcome.value
                trained = Evaluation(
                    str(program), h, float(value["fitness"]), "trained", value["reason"],
                    tuple(value["accuracies"]), value["seconds"], value["compile_seconds"],
                    value["curves"])
            else:
                trained = Evaluation(str(program), h, FLOOR_FITNESS, "trained", outcome.reason)
            if not not_reusable(trained.reason):
                self._put(trained, program, fp)
            first, *others = to_train[h]
            answer(first, Evaluation(texts[first], h, trained.fitness, "trained", trained.reason,
                                     trained.accuracies, trained.seconds, trained.compile_seconds,
                                     trained.curves))
            for i in others:
                twin = self.mode.parse(texts[i])
                if twin.hash == h:
                    answer(i, Evaluation(texts[i], h, trained.fitness, "store", trained.reason,
                                         trained.accuracies))
                    continue
                evaluation = Evaluation(texts[i], twin.hash, trained.fitness, "fingerprint",
                                        trained.reason, trained.accuracies)
                if not not_reusable(trained.reason):
                    self._put(evaluation, twin, fp)
                answer(i, evaluation)
        return [answers[i] for i in range(len(texts))]

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
