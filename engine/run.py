"""`python -m engine.run`: evolve an optimizer (ALR) or a learning-rate schedule (DLR).

One run lives in one directory (``runs/<mode>-<preset>-<time>-seed<N>`` unless ``--out`` says
otherwise) that holds everything needed to watch, resume, reproduce and use it:

  config.json        the resolved settings and the command lines that started / reproduce it
  grammar.bnf        the grammar the run evolves in (a copy: resuming never rereads the original)
  checkpoints/       the evolve loop's checkpoint after every generation (two newest kept)
  events.jsonl       one line per answered candidate, generation and session, as they happen
  summary.json, history.csv, hall_of_fame.{json,md}, report.md, plots/, kernels/,
  best_optimizer.py  written at the end (engine.report, engine.export)

Why it is safe to stop at any moment: the evolve loop checkpoints every generation and the
results store keeps every candidate already trained, so ``--resume`` after Ctrl-C, a SIGKILL or
a time budget replays the interrupted generation mostly from the store and carries on exactly as
an uninterrupted run would (same seed, same history).

Errors a user can make (a bad flag, preset, grammar, seed file, output directory, missing data)
are one line on stderr and exit status 2. Ctrl-C exits with 130 after saying how to resume.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import re
import shlex
import signal
import sys
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from codegen.ir import ParseError, Program, Schedule
from engine.cli import Parser, UsageError, positive_int
from engine.evolve import CheckpointError, EvolutionConfig, GenerationRecord, evolve, \
    load_checkpoint
from engine.grammar import ALR_GRAMMAR, DLR_GRAMMAR, Grammar, GrammarError, load_grammar
from engine.seeds import DEFAULT_SEED_LR, SeedError, baseline, read_seed_file, snap_all, zoo_seeds
from engine.store import versions
from engine.tasks import PRESETS

__all__ = ["PRESET_DEFAULTS", "UsageError", "main"]

FORMAT = "autolr-run"
VERSION = 1

# Per preset and mode: the search (EvolutionConfig fields; p_cross and p_mut default to the
# reference's 0.9 and 0.15) and the time limit per candidate (s). ALR needs max_depth 16 for the
# Adam seed (every op costs two levels: expr -> fun -> expr). quick is sized by measurement to
# fit the issue's ~10 minutes on a 2-core CPU with 2 local workers, busy machine included: most
# random and mutated ALR programs are screened, answered by the store or diverge within an epoch,
# so a generation of 40 costs ~8-18 s; 40 x 30 took 330 s quiet (271 trainings), and its best
# beat the seeds only in generation 29 (30 x 12, 142 s, never did).
PRESET_DEFAULTS: dict[str, dict[str, dict]] = {
    "smoke": {
        "alr": dict(population=6, generations=3, elitism=1, tournament=2, min_depth=4,
                    max_depth=17, time_limit=120.0),
        "dlr": dict(population=4, generations=2, elitism=1, tournament=2, min_depth=2,
                    max_depth=6, time_limit=120.0),
    },
    "quick": {
        "alr": dict(population=40, generations=30, elitism=2, tournament=4, p_cross=0.3,
                    p_mut=0.05, min_depth=4, max_depth=17, time_limit=300.0),
        "dlr": dict(population=10, generations=6, elitism=1, tournament=3, min_depth=2,
                    max_depth=8, time_limit=300.0),
    },
    "paper": {  # REFERENCE.md's example config; run it on a GPU or a cluster (--executor ray)
        "alr": dict(population=20, generations=250, elitism=1, tournament=5, min_depth=6,
                    max_depth=17, time_limit=None),
        "dlr": dict(population=20, generations=100, elitism=1, tournament=5, min_depth=2,
                    max_depth=10, time_limit=None),
    },
}
# What --resume may change: how the run is executed, and how far it goes.
RESUMABLE = ("generations", "time_budget", "time_limit", "executor", "workers", "ray_address",
             "store", "backend")


class BudgetExhausted(Exception):
    """The --time-budget is spent: stop at the end of this generation or now."""


def _duration(text: str) -> float:
    """'600', '90s', '10m', '1h30m' -> seconds."""
    match = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*",
                         text)
    if not text.strip() or not match or not any(match.groups()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 600, 90s, 10m, 1h30m)")
    h, m, s = (float(g) if g else 0.0 for g in match.groups())
    seconds = 3600 * h + 60 * m + s
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration must be positive")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    rows = []
    for name, d in PRESET_DEFAULTS.items():
        a, b = d["alr"], d["dlr"]
        limit = "none" if a["time_limit"] is None else f"{a['time_limit']:.0f} s"
        rows.append(f"  {name:<7} ALR {a['population']}x{a['generations']}, DLR "
                    f"{b['population']}x{b['generations']}, time limit {limit}")
    presets = "/".join(PRESET_DEFAULTS)
    p = Parser(
        prog="python -m engine.run",
        description="Evolve a neural-network optimizer (ALR) or learning-rate schedule (DLR)\n"
                    "with grammatical evolution. With no flags: the quick ALR preset into a new\n"
                    "directory under runs/, which the run prints.",
        epilog="presets (population x generations, per-candidate time limit):\n"
               + "\n".join(rows) + "\n\n"
               "Ctrl-C saves and prints the command that resumes the run. Watch or inspect a run "
               "with:\n  python -m engine.show RUN_DIR",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("alr", "dlr"), default=None,
                   help="alr: a per-weight optimizer; dlr: an SGD learning-rate schedule "
                        "(default: alr)")
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help=f"task and search size, {presets}; see below (default: quick)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the search and of the data split (default: 0)")
    p.add_argument("--out", type=Path, default=None,
                   help="run directory (default: runs/<mode>-<preset>-<time>-seed<N>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest checkpoint; its settings come "
                        f"from its config.json, and only {', '.join('--' + r.replace('_', '-') for r in RESUMABLE)} may change")
    p.add_argument("--executor", choices=("serial", "local", "ray"), default=None,
                   help="where candidates train: in this process, a local process pool, or Ray "
                        "(default: local)")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="parallel trainings (default: one per CPU core; 1 for serial)")
    p.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (with --executor ray); default: a private local Ray")
    p.add_argument("--generations", type=positive_int, default=None,
                   help="generations, the initial population included (default: the preset's)")
    p.add_argument("--population", type=positive_int, default=None,
                   help="population size (default: the preset's)")
    p.add_argument("--grammar", type=Path, default=None,
                   help=f"BNF grammar file (default: {ALR_GRAMMAR.name} or {DLR_GRAMMAR.name} "
                        "in engine/grammars)")
    p.add_argument("--seed-programs", type=Path, default=None, metavar="FILE",
                   help="start from these programs: one per block, blocks separated by blank "
                        "lines, an optional '# name' line first; lr and constants are snapped "
                        "to the grammar")
    p.add_argument("--seed-lr", type=float, default=None, metavar="LR",
                   help=f"the constant lr becomes in --seed-programs (default: {DEFAULT_SEED_LR})")
    p.add_argument("--seed-zoo", action=argparse.BooleanOptionalAction, default=None,
                   help="seed the first population with snapped Adam, RMSprop and momentum "
                        "(DLR: a constant and a step schedule) (default: on)")
    p.add_argument("--time-budget", type=_duration, default=None, metavar="DURATION",
                   help="stop cleanly after this much wall time (e.g. 600, 10m, 1h30m), with a "
                        "checkpoint and every output; --resume continues (default: none)")
    p.add_argument("--time-limit", type=_duration, default=None, metavar="DURATION",
                   help="per-candidate training limit; past it a candidate gets the floor fitness "
                        "(default: the preset's)")
    p.add_argument("--store", type=Path, default=None,
                   help="results store shared across runs (default: "
                        "$AUTOLR_CACHE/results.sqlite, else ~/.cache/autolr/results.sqlite)")
    p.add_argument("--backend", choices=("auto", "numba", "triton", "torch"), default=None,
                   help="kernel backend for ALR candidates (default: auto: triton on CUDA, "
                        "numba on the CPU)")
    return p


# -- settings ----------------------------------------------------------------------------------


def _python() -> str:
    """This interpreter as the user can type it: relative to the working directory when inside
    it (.venv/bin/python), else its full path (a bare `python` may be another one)."""
    exe = Path(sys.executable)
    try:
        return str(exe.relative_to(Path.cwd()))
    except ValueError:
        return str(exe)


def _default_store() -> Path:
    from codegen.cache import cache_root

    return cache_root() / "results.sqlite"


def _fresh_dir(mode: str, preset: str, seed: int) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{mode}-{preset}-{stamp}-seed{seed}"
    out, k = base, 2
    while out.exists():
        out, k = base.with_name(f"{base.name}-{k}"), k + 1
    return out


def _load_grammar(path: Path, mode: str) -> Grammar:
    try:
        grammar = load_grammar(path)
    except GrammarError as err:
        raise UsageError(str(err)) from None
    # A grammar for the other mode would make every candidate a parse error: say so now.
    import random

    from engine.sge import initialise

    sample = initialise(grammar, random.Random(0), 1, max(grammar.shortest[grammar.start], 6))
    try:
        (Schedule if mode == "dlr" else Program).parse(sample.phenotype)
    except (ParseError, ValueError) as err:
        what = "schedules" if mode == "dlr" else "ALR programs"
        raise UsageError(f"{path}: its phenotypes are not {what} (--mode {mode}), e.g. "
                         f"{sample.phenotype[:60]!r}: {' '.join(str(err).split())}") from None
    return grammar


def new_config(args: argparse.Namespace, argv: list[str]) -> dict:
    mode, preset = args.mode or "alr", args.preset or "quick"
    seed = 0 if args.seed is None else args.seed
    d = PRESET_DEFAULTS[preset][mode]
    population = args.population or d["population"]
    try:
        evolution = EvolutionConfig(
            population=population, generations=args.generations or d["generations"],
            elitism=min(d["elitism"], population - 1), tournament=min(d["tournament"], population),
            p_cross=d.get("p_cross", 0.9), p_mut=d.get("p_mut", 0.15),
            min_depth=d["min_depth"], max_depth=d["max_depth"], seed=seed)
    except ValueError as err:
        raise UsageError(str(err)) from None
    grammar_path = args.grammar or (DLR_GRAMMAR if mode == "dlr" else ALR_GRAMMAR)
    grammar = _load_grammar(grammar_path, mode)
    seed_lr = DEFAULT_SEED_LR if args.seed_lr is None else args.seed_lr
    programs = zoo_seeds(mode) if args.seed_zoo is not False else []
    try:
        if args.seed_programs is not None:
            programs += read_seed_file(args.seed_programs, seed_lr)
        seeds = snap_all(programs, grammar, mode, evolution.max_depth)
    except SeedError as err:
        raise UsageError(str(err)) from None
    if len(seeds) > population:
        raise UsageError(f"{len(seeds)} seed programs do not fit in a population of "
                         f"{population}; raise --population or seed fewer")
    out = args.out or _fresh_dir(mode, preset, seed)
    reproduce = ["-m", "engine.run", "--mode", mode, "--preset", preset, "--seed", str(seed),
                 "--population", str(evolution.population), "--generations",
                 str(evolution.generations)]
    if args.grammar:
        reproduce += ["--grammar", str(args.grammar)]
    if args.seed_programs:
        reproduce += ["--seed-programs", str(args.seed_programs), "--seed-lr", repr(seed_lr)]
    if args.seed_zoo is False:
        reproduce.append("--no-seed-zoo")
    return {
        "format": FORMAT, "version": VERSION, "name": out.name, "out": str(out),
        "mode": mode, "preset": preset, "seed": seed, "evolution": asdict(evolution),
        "grammar": str(Path(grammar_path).resolve()), "grammar_text": grammar.text,
        "seeds": seeds, "seed_zoo": args.seed_zoo is not False,
        "seed_programs": None if args.seed_programs is None else str(args.seed_programs),
        "seed_lr": seed_lr,
        "time_limit": args.time_limit if args.time_limit is not None else d["time_limit"],
        "time_budget": args.time_budget, "executor": args.executor or "local",
        "workers": args.workers, "ray_address": args.ray_address,
        "store": str((args.store or _default_store()).expanduser().resolve()),
        "backend": args.backend or "auto",
        "command": shlex.join(["python", "-m", "engine.run", *argv]),
        "reproduce": shlex.join(["python", *reproduce]),
        "created": datetime.now().astimezone().isoformat(timespec="seconds"),
        "versions": versions(),
    }


def resumed_config(args: argparse.Namespace, out: Path) -> dict:
    path = out / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--resume: {out} holds no run to resume (no checkpoint and no "
                         "config.json); start a run there without --resume") from None
    except (OSError, ValueError) as err:
        raise UsageError(f"--resume: cannot read {path} ({err})") from None
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise UsageError(f"--resume: {path} is not an AutoLR run config of version {VERSION}")
    fixed = {"mode": config["mode"], "preset": config["preset"], "seed": config["seed"],
             "population": config["evolution"]["population"],
             "seed_zoo": config["seed_zoo"]}
    for name, saved in fixed.items():
        given = getattr(args, name)
        if given is not None and given != saved:
            raise UsageError(f"--resume: --{name.replace('_', '-')} {given} differs from the "
                             f"run's {saved}; only {', '.join(RESUMABLE)} may change")
    if args.grammar is not None or args.seed_programs is not None or args.seed_lr is not None:
        raise UsageError("--resume: the run keeps the grammar and seed programs it started "
                         f"with (saved in {out}/config.json); drop --grammar/--seed-programs")
    config = dict(config)
    if args.generations is not None:
        try:
            EvolutionConfig(**{**config["evolution"], "generations": args.generations})
        except ValueError as err:
            raise UsageError(str(err)) from None
        config["evolution"] = {**config["evolution"], "generations": args.generations}
    for name in RESUMABLE[1:]:
        value = getattr(args, name)
        if value is not None:
            config[name] = str(value.expanduser().resolve()) if isinstance(value, Path) else value
    return config


def _checkpoints(out: Path) -> Path:
    return out / "checkpoints"


def latest_checkpoint(out: Path) -> dict | None:
    """The newest checkpoint that loads (as evolve resumes from it), or None."""
    for path in sorted(_checkpoints(out).glob("gen-*.json"), reverse=True):
        try:
            return load_checkpoint(path)
        except CheckpointError:
            continue
    return None


def check_out_dir(out: Path, config: dict) -> None:
    """A fresh run needs a new or empty directory: never mix two runs' files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory")
    saved = out / "config.json"
    if saved.exists():
        try:
            old = json.loads(saved.read_text(encoding="utf-8"))
            same = all(old.get(k) == config[k] for k in ("mode", "preset", "seed", "evolution"))
            what = "this run" if same else (f"a different run ({old.get('mode')}, preset "
                                            f"{old.get('preset')}, seed {old.get('seed')})")
        except (OSError, ValueError):
            what = "a run"
        raise UsageError(f"{out} already holds {what}; pass --resume to continue it, or choose "
                         "another --out")
    if any(out.iterdir()):
        raise UsageError(f"{out} is not empty and holds no AutoLR run; choose a new or empty "
                         "directory for --out")


# -- the run -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # SIGTERM stops like Ctrl-C; and Ctrl-C works even where the shell started us with SIGINT
    # ignored (a background job of a non-interactive shell), so `kill -INT` always saves.
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _terminate),
                signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}
    try:
        return _main(argv)
    except UsageError as err:
        print(f"engine.run: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _terminate(signum, frame):  # SIGTERM behaves as Ctrl-C: checkpointed stop, resume hint
    raise KeyboardInterrupt


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.resume:
        if args.out is None:
            raise UsageError("--resume needs --out RUN_DIR, the directory of the run to continue")
        config = resumed_config(args, args.out)
        out = args.out
    else:
        config = new_config(args, argv)
        out = Path(config["out"])
        check_out_dir(out, config)
    if config["executor"] != "ray" and config["ray_address"]:
        raise UsageError("--ray-address applies to --executor ray")
    if config["executor"] == "serial" and config["workers"] not in (None, 1):
        raise UsageError("--executor serial runs one candidate at a time; drop --workers")
    if not config.get("ray_address"):
        _check_data()
    return Session(out, config, resumed=args.resume).run()


def _check_data() -> None:
    from engine.data import DataCorruptError, DataNotFoundError, load_fashion_mnist

    try:
        load_fashion_mnist("train")
    except (DataNotFoundError, DataCorruptError) as err:
        raise UsageError(str(err)) from None


class Session:
    """One process's share of a run: sets up the store and executor, drives evolve, logs each
    answer to events.jsonl, keeps the display current, and writes the outputs at the end."""

    def __init__(self, out: Path, config: dict, resumed: bool) -> None:
        self.out, self.config, self.resumed = out, config, resumed
        self.mode, self.preset, self.seed = config["mode"], config["preset"], config["seed"]
        self.evolution = EvolutionConfig(**config["evolution"])
        self.started = time.time()
        self.budget = config.get("time_budget")
        done = latest_checkpoint(out) if resumed else None
        self.history = [GenerationRecord.from_json(r) for r in done["history"]] if done else []
        self.generation = len(self.history)  # the one being evaluated
        self.generation_started = time.time()
        self.last_generation_seconds = 0.0
        self.events_path = out / "events.jsonl"
        self.curves_dir = Path(config["store"]).parent / "curves" / \
            f"{self.mode}-{self.preset}-seed{self.seed}"

    # -- events and curves ---------------------------------------------------------------------

    def log(self, event: dict) -> None:
        event.setdefault("time", round(time.time(), 3))
        with open(self.events_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(event, allow_nan=False) + "\n")

    def events(self) -> list[dict]:
        try:
            lines = self.events_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass  # a line cut short by a kill: the rest of the log is still good
        return out

    def save_curves(self, program_hash: str | None, curves: dict) -> None:
        if not program_hash or not curves or not curves.get("val_acc"):
            return
        self.curves_dir.mkdir(parents=True, exist_ok=True)
        final = self.curves_dir / f"{program_hash}.json"
        temp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        temp.write_text(json.dumps({k: [list(t) for t in v] for k, v in curves.items()}))
        os.replace(temp, final)

    def load_curves(self, program_hash: str) -> dict | None:
        try:
            return json.loads((self.curves_dir / f"{program_hash}.json").read_text())
        except (OSError, ValueError):
            return None

    # -- the fitness function and the generation hook --------------------------------------------

    def fitness(self, texts):
        self.generation_started = time.time()
        self.display.start_generation(self.generation, len(texts))
        results = self.evaluator.evaluate(texts, on_result=self._answered)
        return [r.fitness for r in results]

    def _answered(self, evaluation) -> None:
        self.log({"event": "evaluation", "generation": self.generation, "text": evaluation.text,
                  "hash": evaluation.hash, "fitness": evaluation.fitness,
                  "source": evaluation.source, "reason": evaluation.reason,
                  "seconds": round(evaluation.seconds, 3)})
        if evaluation.source == "trained":
            self.save_curves(evaluation.hash, evaluation.curves)
        self.display.answered(evaluation)
        if self.budget is not None and time.time() - self.started > self.budget:
            raise BudgetExhausted(f"the time budget ran out during generation {self.generation}")

    def generation_done(self, record: GenerationRecord) -> None:
        seconds = time.time() - self.generation_started
        self.last_generation_seconds = seconds
        self.log({"event": "generation", "generation": record.generation,
                  "seconds": round(seconds, 1), "best": record.best, "median": record.median})
        self.history.append(record)
        self.display.generation_done(record, seconds)
        self.generation = record.generation + 1
        if self.budget is not None and self.generation < self.evolution.generations:
            elapsed = time.time() - self.started
            if elapsed + self.last_generation_seconds > self.budget:
                raise BudgetExhausted(f"the time budget leaves too little for generation "
                                      f"{self.generation} (the last one took {seconds:.0f} s)")

    # -- the whole session -----------------------------------------------------------------------

    def run(self) -> int:
        from engine.evaluate import Evaluator
        from engine.executors import ExecutorError, make_executor
        from engine.grammar import parse_grammar
        from engine.show import Display
        from engine.store import Store, StoreError, versions
        from engine.training import configure_process

        out, config = self.out, self.config
        grammar = parse_grammar(config["grammar_text"], source=config["grammar"])
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "config.json", config)  # a resume may have extended or moved it
        (out / "grammar.bnf").write_text(config["grammar_text"], encoding="utf-8")
        backend = config["backend"]
        import torch

        if backend == "auto":
            backend = "triton" if torch.cuda.is_available() else "numba"
        elif backend == "triton" and not (torch.cuda.is_available()
                                          or os.environ.get("TRITON_INTERPRET") == "1"):
            raise UsageError("--backend triton needs a CUDA device (or TRITON_INTERPRET=1 to "
                             "run it, slowly, in Triton's interpreter); use numba on the CPU")
        initializer = functools.partial(configure_process, threads=1)
        try:
            store = Store(config["store"])
        except StoreError as err:
            raise UsageError(str(err)) from None
        workers = config["workers"] if config["executor"] != "serial" else None
        try:
            executor = make_executor(config["executor"], workers, config["ray_address"],
                                     initializer)
        except (ExecutorError, ValueError) as err:
            store.close()
            raise UsageError(str(err).splitlines()[0]) from None
        _end_line(self.events_path)  # a kill may have cut the last line short
        self.log({"event": "session", "resumed": self.resumed, "pid": os.getpid(),
                  "command": shlex.join(["python", "-m", "engine.run", *sys.argv[1:]]),
                  "executor": config["executor"], "workers": executor.workers})
        self.evaluator = Evaluator(self.mode, self.preset, self.seed, store, executor,
                                   time_limit=config["time_limit"], backend=backend,
                                   run=config["name"])
        base_name, base_text = baseline(self.mode)
        known = store.lookup((Schedule if self.mode == "dlr" else Program).parse(base_text).hash,
                             self.preset, self.evaluator.protocol, self.seed)
        self.display = Display(config, self.history, self.events(),
                               None if known is None else (base_name, known.fitness),
                               workers=executor.workers)
        status = "finished"
        try:
            with executor, store, self.display:
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
        except CheckpointError as err:
            raise UsageError(str(err)) from None
        from engine.show import print_summary

        print_summary(summary, out)
        if status != "finished":
            print(f"Continue with:\n  {self.resume_command()}")
        return 0

    def _evolve(self, grammar: Grammar) -> str | None:
        """Run evolve; the reason it stopped early, or None when it finished."""
        try:
            evolve(grammar, self.evolution, self.fitness, seeds=self.config["seeds"],
                   checkpoint_dir=_checkpoints(self.out), resume=self.resumed,
                   on_generation=self.generation_done)
        except BudgetExhausted as err:
            reason = str(err)
        else:
            return None
        gc.collect()  # the abandoned executor run closes, stopping its jobs, before we go on
        self.log({"event": "stopped", "reason": reason})
        return reason

    def finish(self, status: str, base_name: str, base_text: str, executor, versions) -> dict:
        from engine.evaluate import Evaluator, Job, train
        from engine.report import Outcome, write_all

        body = latest_checkpoint(self.out)
        history = [GenerationRecord.from_json(r) for r in body["history"]]
        best_text, _ = max(((r.best_phenotype, r.best) for r in history), key=lambda p: p[1])
        parse = Schedule.parse if self.mode == "dlr" else Program.parse
        base_eval = Evaluator(self.mode, self.preset, self.seed, self.evaluator.store, executor,
                              time_limit=self.config["time_limit"],
                              backend=self.evaluator.backend, run=self.config["name"])
        [answer] = base_eval.evaluate([base_text])
        if answer.source == "trained":
            self.save_curves(answer.hash, answer.curves)
        from engine.report import program_size

        base = {"name": base_name, "program": base_text, "hash": answer.hash,
                "fitness": answer.fitness, "accuracies": list(answer.accuracies),
                "source": answer.source, "reason": answer.reason,
                "size": program_size(self.mode, base_text)}
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
            jobs = [Job(self.mode, text, self.preset, self.seed, self.config["time_limit"],
                        self.evaluator.backend) for _, text in missing]
            for index, outcome in executor.run(train, jobs):
                if outcome.ok:
                    self.save_curves(missing[index][0], outcome.value["curves"])
                    curves[missing[index][0]] = self.load_curves(missing[index][0])
        outcome = Outcome(run_dir=self.out, config=self.config, history=history,
                          events=self.events(), status=status, baseline=base,
                          curves={k: v for k, v in curves.items() if v}, versions=versions)
        return write_all(outcome)

    def resume_command(self) -> str:
        return shlex.join([_python(), "-m", "engine.run", "--resume", "--out", str(self.out)])


def _end_line(path: Path) -> None:
    try:
        with open(path, "rb+") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() and (handle.seek(-1, os.SEEK_END), handle.read(1))[1] != b"\n":
                handle.write(b"\n")
    except FileNotFoundError:
        pass


def _write_json(path: Path, data: object) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(temp, path)


if __name__ == "__main__":
    sys.exit(main())
