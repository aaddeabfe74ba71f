"""`python -m engine.run`: evolve an optimizer (ALR) or a learning-rate schedule (DLR).

One run lives in one directory (``runs/<mode>-<preset>-<time>-seed<N>`` unless ``--out`` says
otherwise) that holds everything needed to watch, resume, reproduce and use it:

  config.json        the resolved settings and the command lines that started / reproduce it
  grammar.bnf        the grammar the run evolves in (a copy: resuming never rereads the original)
  checkpoints/       the evolve loop's checkpoint after every generation (two newest kept)
  events.jsonl       one line per answered candidate, generation and session, as they happen
  summary.json, history.csv, hall_of_fame.{json,md}, report.md, plots/, kernels/,
  best_program.txt, best_optimizer.py  written at the end (engine.app.report, engine.modes.export)

Why it is safe to stop at any moment: the evolve loop checkpoints every generation and the
results store keeps every candidate already trained, so ``--resume`` after Ctrl-C, a SIGKILL or
a time budget replays the interrupted generation mostly from the store and carries on exactly as
an uninterrupted run would (same seed, same history).

The settings (presets, flags, config.json) live in `engine.app.config`, how the directory's files
are written and read in `engine.rundir`, what ALR and DLR do differently in `engine.modes`; this
module runs them.
Errors a user can make (a bad flag, preset, grammar, seed file, output directory, missing data)
are one line on stderr and exit status 2. Ctrl-C exits with 130 after saying how to resume.

A run never reports a result its set-up made meaningless: a kernel cache it cannot write or a
baseline that does not compile in a worker stop it before generation 0 (before the run directory
is touched); a generation whose every training failed for a reason that is not the candidate's
own (`engine.fitness.store.not_reusable`: an exception, a timeout, a dead worker), or a baseline that
fails, stop it with exit status 2 and the reason, never a "finished" report. One process owns a
run directory at a time (`engine.app.runlock`); a second gets exit status 2 and the first one's pid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from engine.app.cli import UsageError
from engine.evolution.evolve import CheckpointError, GenerationRecord, RunResult, evolve
from engine.evolution.grammar import Grammar
from engine.app import preflight
from engine.app.config import RunConfig, build_parser, new_config, \
    resumed_config
from engine.app.flagfile import with_config_file
from engine.app.flags import remutate_same
from engine.tasks.protocol import get_task  # a preset's Task, on --device
from engine.rundir import CHECKPOINTS, EVENTS, append_event, end_line, newest_checkpoint, \
    read_events, write_atomic, write_json
from engine.app.runlock import RunLock, RunLocked
from engine.fitness.store import StoreError

__all__ = ["main"]


class BudgetExhausted(Exception):
    """The --time-budget is spent: stop at the end of this generation or now."""


class RunFailed(Exception):
    """The run cannot go on for a reason that is no candidate's own (the machine, the set-up):
    going on would floor every candidate and report a result that means nothing."""


def _python() -> str:
    """This interpreter as the user can type it: relative to the working directory when inside
    it (.venv/bin/python), else its full path (a bare `python` may be another one)."""
    exe = Path(sys.executable)
    try:
        return str(exe.relative_to(Path.cwd()))
    except ValueError:
        return str(exe)


# -- the run -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # SIGTERM stops like Ctrl-C; and Ctrl-C works even where the shell started us with SIGINT
    # ignored (a background job of a non-interactive shell), so `kill -INT` always saves.
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _terminate),
                signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}
    try:
        return _main(argv)
    except (UsageError, StoreError) as err:  # StoreError: the store damaged at some lookup
        print(f"engine.run: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a started run handles its own; this one had not started
        print("\nInterrupted before the run started; nothing of it was written.",
              file=sys.stderr)
        return 130
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _terminate(signum, frame):  # SIGTERM behaves as Ctrl-C: checkpointed stop, resume hint
    raise KeyboardInterrupt


def _main(argv: list[str]) -> int:
    parser = build_parser()
    args = with_config_file(parser, parser.parse_args(argv))
    if args.resume:
        if args.out is None:
            raise UsageError("--resume needs --out RUN_DIR, the directory of the run to continue")
        # A copied or moved run continues where it now is: say so, and save it so.
        config = resumed_config(args, args.out)
    else:
        config = new_config(args, argv)
        preflight.check_out_dir(config.out, config)
    if config.tensorboard is not None:
        from engine.app.tracking import TrackingUnavailable, check_available

        try:
            check_available()
            config.tensorboard.mkdir(parents=True, exist_ok=True)
        except TrackingUnavailable as err:
            raise UsageError(str(err)) from None
        except OSError as err:  # now, not after the first generation
            raise UsageError(f"--tensorboard {config.tensorboard}: cannot write there "
                             f"({err.strerror}); choose another directory") from None
    task = preflight.check_task(config)
    preflight.check_tiers(config)
    if task is not None and args.resume and config.task_digest not in (None, task.digest):
        raise UsageError(f"--resume: the task {config.task} changed since the run started "
                         "(its file or settings), so its fitnesses would not compare with the "
                         "run's; start a new run (another --out) to evolve on the edited task")
    if task is not None:
        config = dataclasses.replace(config, task_digest=task.digest)
    if task is None and not config.ray_address:
        preflight.check_data()
    preflight.check_store(config.store)
    return Session(config.out, config, resumed=args.resume, task=task).run()


class Session:
    """One process's share of a run: sets up the store and executor, drives evolve, logs each
    answer to events.jsonl, keeps the display current, and writes the outputs at the end."""

    def __init__(self, out: Path, config: RunConfig, resumed: bool, task=None) -> None:
        """`task`: the checked TaskRef of a --task run (`check_task`), else None."""
        self.out, self.config, self.resumed = out, config, resumed
        self.task = task
        self.mode, self.preset, self.seed = config.mode, config.preset, config.seed
        self.evolution = config.evolution
        self.started = time.time()
        self.budget = config.time_budget
        self.history: list[GenerationRecord] = []  # read in `run`, once the run is ours
        self.result: RunResult | None = None  # what evolve returned, when it ran to the end
        self.generation = 0  # the one being evaluated
        self.generation_started = time.time()
        self._evaluating: int | None = None  # the generation `fitness` was last called for
        self.last_generation_seconds = 0.0
        self.events_path = out / EVENTS
        self.tracker = None  # engine.app.tracking.TensorBoardLog with --tensorboard
        self.curves_dir = config.store.parent / "curves" / \
            f"{self.mode.name}-{task.key if task else self.preset}-seed{self.seed}"

    # -- events and curves ---------------------------------------------------------------------

    def log(self, event: dict) -> None:
        event.setdefault("time", round(time.time(), 3))
        append_event(self.events_path, event)

    def events(self) -> list[dict]:
        # A line cut short by a kill is skipped: the rest of the log is still good.
        return read_events(self.events_path).events

    def save_curves(self, program_hash: str | None, curves: dict) -> None:
        if not program_hash or not curves or not curves.get("val_acc"):
            return
        self.curves_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.curves_dir / f"{program_hash}.json",
                     json.dumps({k: [list(t) for t in v] for k, v in curves.items()}))

    def load_curves(self, program_hash: str) -> dict | None:
        try:
            return json.loads((self.curves_dir / f"{program_hash}.json").read_text())
        except (OSError, ValueError):
            return None

    # -- the fitness function and the generation hook --------------------------------------------

    def fitness(self, texts):
        # --refine-constants calls this again within a generation: its time and its outcome
        # counts run on from the first call (the time forecasts --time-budget's next generation).
        again = self._evaluating == self.generation
        if not again:
            self._evaluating, self.generation_started = self.generation, time.time()
            if self.tracker is not None:
                self.tracker.start_generation()
        kept = self.display.counts if again else None
        self.display.start_generation(self.generation, len(texts))
        if kept is not None:
            self.display.counts = kept
        funnel = self.scorer is not self.evaluator
        before = (self.scorer.trainings, self.scorer.train_seconds) if funnel else None
        results = self.scorer.evaluate(texts, on_result=self._answered)
        if funnel:
            self.display.funnel = self.scorer.counts()
            self.log({"event": "funnel", "generation": self.generation,
                      "tiers": self.scorer.counts(),
                      "trainings": self.scorer.trainings - before[0],
                      "train_seconds": round(self.scorer.train_seconds - before[1], 3)})
        _check_not_all_broken(self.generation, results)
        return [r.fitness for r in results]

    def _answered(self, evaluation) -> None:
        self.log({"event": "evaluation", "generation": self.generation, "text": evaluation.text,
                  "hash": evaluation.hash, "fitness": evaluation.fitness,
                  "source": evaluation.source, "reason": evaluation.reason,
                  "seconds": round(evaluation.seconds, 3)})
        if evaluation.source == "trained":
            self.save_curves(evaluation.hash, evaluation.curves)
        self.display.answered(evaluation)
        if self.tracker is not None:
            self.tracker.answered(evaluation)
        self._check_budget()

    def _check_budget(self) -> None:
        if self.budget is not None and time.time() - self.started > self.budget:
            raise BudgetExhausted(f"the time budget ran out during generation {self.generation}")

    def generation_done(self, record: GenerationRecord) -> None:
        seconds = time.time() - self.generation_started
        self.last_generation_seconds = seconds
        self.log({"event": "generation", "generation": record.generation,
                  "seconds": round(seconds, 1), "best": record.best, "median": record.median})
        self.history.append(record)
        self.display.generation_done(record, seconds)
        if self.tracker is not None:
            self.tracker.generation_done(record, seconds)
        self.generation = record.generation + 1
        if self.budget is not None and self.generation < self.evolution.generations:
            elapsed = time.time() - self.started
            if elapsed + self.last_generation_seconds > self.budget:
                raise BudgetExhausted(f"the time budget leaves too little for generation "
                                      f"{self.generation} (the last one took {seconds:.0f} s)")

    # -- the whole session -----------------------------------------------------------------------

    def run(self) -> int:
        from engine.exec import ExecutorError, make_executor
        from engine.evolution.grammar import parse_grammar
        from engine.fitness.store import Store, StoreError
        from engine.tasks.training import configure_process

        config = self.config
        grammar = parse_grammar(config.grammar_text, source=str(config.grammar))
        backend = config.backend
        from codegen import backends

        if backend == "auto":
            backend = backends.auto()
        elif not backends.get(backend).available(None):
            raise UsageError(f"--backend {backend}: {backends.get(backend).missing}")
        if self.mode.compiled and not config.ray_address:
            preflight.check_kernel_cache()
        initializer = functools.partial(configure_process, threads=1)
        try:
            store = Store(config.store)
        except StoreError as err:
            raise UsageError(str(err)) from None
        workers = config.workers if config.executor != "serial" else None
        try:
            executor = make_executor(config.executor, workers, config.ray_address, initializer)
        except (ExecutorError, ValueError) as err:
            store.close()
            raise UsageError(str(err).splitlines()[0]) from None
        with executor, store:
            # Before the run directory is touched: a set-up that cannot train (a kernel cache
            # that is a file, a broken compiler) fails here, leaving nothing that blocks a retry.
            self._check_baseline_compiles(executor, backend)
            try:
                lock = RunLock(self.out, shlex.join(["python", "-m", "engine.run",
                                                     *sys.argv[1:]]))
                lock.acquire()
            except RunLocked as err:
                raise UsageError(str(err)) from None
            with lock:
                return self._run_locked(grammar, store, executor, backend)

    def _check_baseline_compiles(self, executor, backend: str) -> None:
        """One compile of the baseline's kernel where candidates will train."""
        from engine.fitness.evaluator import Job, compile_kernel

        if not self.mode.compiled:
            return  # nothing is generated or compiled
        name, text = self.mode.baseline()
        job = Job.build(self.mode, text, self.preset, self.seed, self.config.time_limit, backend)
        for _, outcome in executor.run(compile_kernel, [job]):
            if not outcome.ok:
                raise UsageError(f"the baseline {name} does not compile in a worker "
                                 f"({outcome.reason}), so no candidate could train; fix that "
                                 "and run again")

    def _evaluator(self, store, executor, backend: str):
        from engine.fitness.evaluator import Evaluator

        return Evaluator(self.mode, self.task or get_task(self.preset, self.config.device),
                         self.seed, store, executor,
                         time_limit=self.config.time_limit, backend=backend,
                         run=self.config.name)

    def _start(self, store, executor, backend: str) -> tuple[str, str]:
        """Set up a (resumed) run: history, run files, evaluator, display, tracker; the mode's
        baseline (name, text)."""
        from engine.app.show import Display

        out, config = self.out, self.config
        done = newest_checkpoint(out / CHECKPOINTS).body if self.resumed else None
        self.history = [GenerationRecord.from_json(r) for r in done["history"]] if done else []
        self.generation = len(self.history)
        out.mkdir(parents=True, exist_ok=True)
        # a resume may have changed it
        write_json(out / "config.json", config.to_json(), allow_nan=True)
        (out / "grammar.bnf").write_text(config.grammar_text, encoding="utf-8")
        end_line(self.events_path)  # a kill may have cut the last line short
        self.log({"event": "session", "resumed": self.resumed, "pid": os.getpid(),
                  "command": shlex.join(["python", "-m", "engine.run", *sys.argv[1:]]),
                  "executor": config.executor, "workers": executor.workers})
        self.evaluator = self.scorer = self._evaluator(store, executor, backend)
        if config.tiers is not None:
            from engine.fitness.funnel import STATE_FILE, FunnelFitness
            from engine.fitness.tiers import Tier

            try:
                tiers = [Tier.from_json(t) for t in config.tiers]
                self.scorer = FunnelFitness(self.evaluator, tiers, out / STATE_FILE,
                                            tick=self._check_budget, device=config.device)
            except (KeyError, TypeError, ValueError) as err:
                raise UsageError(f"config.json: key 'tiers': {err}") from None
        base_name, base_text = self.mode.baseline()
        known = store.lookup(self.mode.parse(base_text).hash,
                             self.evaluator.task, self.evaluator.protocol, self.seed)
        self.display = Display(config, self.history, self.events(),
                               None if known is None else (base_name, known.fitness),
                               workers=executor.workers)
        if config.tensorboard is not None:
            from engine.app.tracking import TensorBoardLog

            self.tracker = TensorBoardLog(config.tensorboard, self.history)
        return base_name, base_text

    def _run_locked(self, grammar: Grammar, store, executor, backend: str) -> int:
        from engine.fitness.store import versions

        out, config = self.out, self.config
        base_name, base_text = self._start(store, executor, backend)
        status = "finished"
        try:
            with self.display, self.tracker or contextlib.nullcontext():
                stopped = self._evolve(grammar)
                if stopped is not None:
                    status = f"stopped: {stopped}"
                if not self.history:
                    self.display.message(f"Stopped before generation 0 finished ({stopped}); "
                                         f"nothing to report yet. Continue with:\n  "
                                         f"{self.resume_command()}")
                    return 0
                self.display.message("Evolution done; measuring the baseline and writing the "
                                     "report...")
                summary = self.finish(status, base_name, base_text, executor, versions())
        except KeyboardInterrupt:
            self.log({"event": "interrupted", "generation": self.generation})
            done = len(self.history)
            where = (f"during generation {self.generation}" if done < self.evolution.generations
                     else "while writing the outputs (every generation is done)")
            held = (f"The checkpoint holds {done} generation{'s' * (done != 1)}" if done else
                    "No generation is checkpointed yet")
            print(f"\nInterrupted {where}. {held}, and every candidate trained so far is in the "
                  f"results store.\nResume with:\n  {self.resume_command()}", file=sys.stderr)
            return 130
        except RunFailed as err:
            self.log({"event": "failed", "generation": self.generation, "reason": str(err)})
            raise UsageError(f"{err}. Fix that, then continue with: "
                             f"{self.resume_command()}") from None
        except CheckpointError as err:
            raise UsageError(str(err)) from None
        except StoreError as err:  # damaged mid-run: every finished generation is checkpointed
            raise UsageError(f"{err} Then continue the run: {self.resume_command()}") from None
        from engine.app.show import print_summary

        print_summary(summary, out)
        if status != "finished":
            print(f"Continue with:\n  {self.resume_command()}")
        return 0

    def _evolve(self, grammar: Grammar) -> str | None:
        """Run evolve; the reason it stopped early, or None when it finished."""
        try:
            self.result = evolve(grammar, self.evolution, self.fitness, seeds=self.config.seeds,
                                 checkpoint_dir=self.out / CHECKPOINTS, resume=self.resumed,
                                 on_generation=self.generation_done,
                                 same=remutate_same(self.mode, self.preset, self.evolution))
        except BudgetExhausted as err:
            reason = str(err)
        else:
            return None
        gc.collect()  # the abandoned executor run closes, stopping its jobs, before we go on
        self.log({"event": "stopped", "reason": reason})
        return reason

    def finish(self, status: str, base_name: str, base_text: str, executor, versions) -> dict:
        from engine.fitness.evaluator import train
        from engine.app.report import RunOutputs, write_all

        # The history as evolve returned it; a run stopped early has the generations that
        # `generation_done` saw, each checkpointed before it was reported.
        history = list(self.result.history) if self.result is not None else list(self.history)
        best_text, best_fitness = max(((r.best_phenotype, r.best) for r in history),
                                      key=lambda p: p[1])
        parse = self.mode.parse
        base_eval = self._evaluator(self.evaluator.store, executor, self.evaluator.backend)
        [answer] = base_eval.evaluate([base_text])
        if answer.reason is not None:
            raise RunFailed(f"the baseline {base_name} failed ({answer.reason}), so the run "
                            "cannot be measured against it; no report was written")
        if answer.source == "trained":
            self.save_curves(answer.hash, answer.curves)
        base = {"name": base_name, "program": base_text, "hash": answer.hash,
                "fitness": answer.fitness, "accuracies": list(answer.accuracies),
                "source": answer.source, "reason": answer.reason,
                "size": self.mode.size(base_text)}
        self.log({"event": "baseline", **{k: base[k] for k in ("hash", "fitness", "source")}})
        curves = {}
        missing = []
        for text in (best_text, base_text):
            h = parse(text).hash
            found = self.load_curves(h)
            if found is not None:
                curves[h] = found
            elif h not in [m[0] for m in missing]:
                missing.append((h, str(parse(text))))
        if missing:
            self.display.message(f"Retraining {len(missing)} program(s) once for their training "
                                 "curves...")
            jobs = [base_eval.job(parse(text)) for _, text in missing]
            for index, outcome in executor.run(train, jobs):
                if outcome.ok:
                    self.save_curves(missing[index][0], outcome.value.curves)
                    curves[missing[index][0]] = self.load_curves(missing[index][0])
        funnel = getattr(self.scorer, "funnel", None) and self.scorer
        outcome = RunOutputs(run_dir=self.out, config=self.config, history=history,
                          events=self.events(), status=status, baseline=base,
                          curves={k: v for k, v in curves.items() if v}, versions=versions,
                          tiers=funnel and funnel.funnel.summary(),
                          best_detail=self._best_detail(best_text, best_fitness, base, funnel),
                          lr_scales=funnel.lr_scale if funnel else None)
        return write_all(outcome)

    def _best_detail(self, text: str, fitness: float, base: dict, funnel) -> dict:
        """summary.json's best.lr_scale and best.tasks: the funnel's (engine.fitness.funnel,
        `best_detail`), or for a run that trains every candidate once, its one task at scale
        1 against the baseline just measured."""
        if funnel:
            self.display.message("Measuring the best against the baseline on each task...")
            return funnel.best_detail(text)
        from engine.fitness.funnel import relative

        score = max(fitness, 0.0)
        return {"lr_scale": 1.0, "tier": None, "seeds": 1,
                "tasks": [{"task": self.evaluator.task, "score": round(score, 6),
                           "baseline": round(base["fitness"], 6),
                           "relative": round(relative(score, base["fitness"]), 6)}]}

    def resume_command(self) -> str:
        return shlex.join([_python(), "-m", "engine.run", "--resume", "--out", str(self.out)])


def _check_not_all_broken(generation: int, results) -> None:
    """Raise RunFailed when every training of a generation failed for a reason that is not the
    candidate's own (`engine.fitness.store.not_reusable`): that is the machine or the set-up, and
    flooring them all would go on as if the search had spoken. Raised before the generation is
    checkpointed, and such answers are never stored, so a resume trains them again."""
    from engine.fitness.store import not_reusable

    trained = [r for r in results if r.source == "trained"]
    if not trained or not all(not_reusable(r.reason) for r in trained):
        return
    hint = ("; raise --time-limit, or run fewer --workers on a busy machine"
            if any(r.reason.startswith("timeout") for r in trained) else "")
    raise RunFailed(f"every training of generation {generation} ({len(trained)} of them) failed "
                    f"for a reason that is not the candidate's own, e.g. '{trained[0].reason}'"
                    f"{hint}; nothing of generation {generation} was kept")
