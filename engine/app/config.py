"""The settings of an `engine.run` run: presets, the command line, and the run's config.json.

`RunConfig` is a run's settings, typed and validated in one place, and what config.json holds.
`new_config` resolves a fresh run's flags against its preset into one; `resumed_config` reads
a saved config.json back and applies what `--resume` may change (`RESUMABLE`). Every user
error is a `UsageError` (one line, exit 2).
"""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

from codegen import backends
from codegen.ir import ParseError
from engine import modes
from engine.app.cli import Parser, UsageError, positive_int
from engine.app.flags import MAX_SEED, SEARCH_OPTIONS, add_search_flags, check_refine_constants, \
    check_seed, reproduce_args, search_settings
from engine.app.flags import duration as _duration, seed as _seed, tiers as _tiers
from engine.evolution.evolve import EvolutionConfig
from engine.evolution.grammar import Grammar, GrammarError, load_grammar
from engine.modes import MODES, Mode
from engine.evolution.seeds import DEFAULT_SEED_LR, SeedError, read_seed_file, snap_all
from engine.fitness.funnel import default_tiers
from engine.fitness.store import versions
from engine.tasks.protocol import PRESETS
from engine.tasks.registry import FAMILIES, absolute, is_builtin_cnn
from engine.tasks.supervised import TaskError

__all__ = ["MAX_SEED", "PRESET_DEFAULTS", "RESUMABLE", "RunConfig", "build_parser",
           "check_seed", "new_config", "resumed_config"]

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
    # The original system's search (docs/protocol.md, "Search settings"): its example config with
    # the population of 20 of its real ALR runs; the DLR values are ours. For a GPU or a cluster
    # (--executor ray).
    "paper": {
        "alr": dict(population=20, generations=250, elitism=1, tournament=5, min_depth=6,
                    max_depth=17, time_limit=None),
        "dlr": dict(population=20, generations=100, elitism=1, tournament=5, min_depth=2,
                    max_depth=10, time_limit=None),
    },
}
# What --resume may change: how the run is executed, and how far it goes.
RESUMABLE = ("generations", "time_budget", "time_limit", "executor", "workers", "ray_address",
             "store", "backend", "tensorboard")


EXECUTORS = ("serial", "local", "ray")
DEVICES = ("cpu", "cuda")
BACKENDS = ("auto", *backends.BACKENDS)


@dataclass(frozen=True)
class RunConfig:
    """A run's settings, validated once: what config.json holds, typed.

    Built by `new_config` (flags and preset) or `from_json` (a saved run); `resumed` applies
    what --resume may change (`RESUMABLE`). `to_json` is config.json exactly as runs have always
    written it, so runs made before this class existed resume and show unchanged. The fields
    after `evolution` have defaults only so that tools and tests can build a config by hand; a
    run always sets them all.
    """

    name: str
    out: Path
    mode: Mode  # a mode's name is accepted and looked up
    preset: str
    seed: int
    evolution: EvolutionConfig
    grammar: Path | None = None
    grammar_text: str = ""
    seeds: dict[str, str] = field(default_factory=dict)  # name -> snapped program text
    seed_zoo: bool = True
    seed_programs: Path | None = None
    seed_lr: float = DEFAULT_SEED_LR
    time_limit: float | None = None  # per candidate, seconds
    time_budget: float | None = None  # for the whole run, seconds
    executor: str = "local"
    workers: int | None = None
    ray_address: str | None = None
    store: Path | None = None
    backend: str = "auto"
    tensorboard: Path | None = None
    command: str = ""
    reproduce: str = ""
    created: str = ""
    versions: dict = field(default_factory=dict)
    task: str | None = None  # a task reference (--task); None: the preset's Fashion-MNIST CNN
    device: str | None = None  # cpu or cuda (a preset's CNN or a --task); None: a GPU if any
    task_digest: str | None = None  # the --task's definition when the run started
    # The fidelity-tier funnel (engine.fitness.funnel): Tier.to_json() per tier; None: one
    # training per candidate (--tiers off, and every run saved before tiers existed).
    tiers: list | None = None

    def __post_init__(self) -> None:
        if isinstance(self.mode, str):
            found = modes.find(self.mode)
            if found is None:
                raise ValueError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
            object.__setattr__(self, "mode", found)
        if self.preset not in PRESET_DEFAULTS:
            raise ValueError(f"preset {self.preset!r} is not one of {', '.join(PRESET_DEFAULTS)}")
        check_seed(self.seed)
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor {self.executor!r} is not one of {', '.join(EXECUTORS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        for name in ("time_limit", "time_budget"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if self.executor != "ray" and self.ray_address:
            raise ValueError("--ray-address applies to --executor ray")
        if self.device not in (None, *DEVICES):
            raise ValueError(f"device {self.device!r} is not one of {', '.join(DEVICES)}")
        if self.executor == "serial" and self.workers not in (None, 1):
            raise ValueError("--executor serial runs one candidate at a time; drop --workers")

    def resumed(self, out: Path, generations: int | None = None, **changes) -> RunConfig:
        """This run continued in `out` with some of `RESUMABLE` changed; paths are resolved."""
        unknown = set(changes) - set(RESUMABLE)
        if unknown:
            raise ValueError(f"a resume cannot change {', '.join(sorted(unknown))}; only "
                             f"{', '.join(RESUMABLE)} may change")
        for name, value in changes.items():
            if isinstance(value, Path):
                changes[name] = value.expanduser().resolve()
        if generations is not None:
            changes["evolution"] = replace(self.evolution, generations=generations)
        return replace(self, out=out, **changes)

    def to_json(self) -> dict:
        """config.json's object, key for key as engine.run has always written it."""
        def text(path: Path | None) -> str | None:
            return None if path is None else str(path)

        data = {
            "format": FORMAT, "version": VERSION, "name": self.name, "out": str(self.out),
            "mode": self.mode.name, "preset": self.preset, "seed": self.seed,
            "evolution": asdict(self.evolution), "grammar": text(self.grammar),
            "grammar_text": self.grammar_text, "seeds": dict(self.seeds),
            "seed_zoo": self.seed_zoo, "seed_programs": text(self.seed_programs),
            "seed_lr": self.seed_lr, "time_limit": self.time_limit,
            "time_budget": self.time_budget, "executor": self.executor, "workers": self.workers,
            "ray_address": self.ray_address, "store": text(self.store), "backend": self.backend,
            "tensorboard": text(self.tensorboard), "command": self.command,
            "reproduce": self.reproduce, "created": self.created, "versions": self.versions,
        }
        # Only when set: a preset run's config.json stays what it always was.
        data.update({k: v for k, v in (("task", self.task), ("device", self.device),
                                       ("task_digest", self.task_digest),
                                       ("tiers", self.tiers)) if v})
        return data

    @classmethod
    def from_json(cls, data: object, source: str = "config.json") -> RunConfig:
        """A saved run's config; a ValueError naming the first bad key for a damaged or foreign
        file (one line: `source`, the key, what was wrong)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT \
                or data.get("version") != VERSION:
            raise ValueError(f"{source} is not an AutoLR run config of version {VERSION}")
        values = {}
        for key, kinds in _JSON_KEYS.items():
            if key in _OPTIONAL_KEYS and key not in data:  # written before the key existed
                continue
            if key not in data:
                raise ValueError(f"{source}: key {key!r} is missing; restore the file from a "
                                 "copy of the run")
            value = data[key]
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise ValueError(f"{source}: key {key!r} holds {value!r}, not "
                                 f"{' or '.join(_KIND_NAMES[k] for k in kinds)}; restore the "
                                 "file from a copy of the run")
            values[key] = Path(value) if key in _PATH_KEYS and value is not None else value
        try:
            values["evolution"] = EvolutionConfig(**values["evolution"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: key 'evolution': {err}") from None
        try:
            return cls(**values)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None


_NUMBER = (int, float)
_JSON_KEYS: dict[str, tuple[type, ...]] = {
    "name": (str,), "out": (str,), "mode": (str,), "preset": (str,), "seed": (int,),
    "evolution": (dict,), "grammar": (str,), "grammar_text": (str,), "seeds": (dict,),
    "seed_zoo": (bool,), "seed_programs": (str, type(None)), "seed_lr": _NUMBER,
    "time_limit": (*_NUMBER, type(None)), "time_budget": (*_NUMBER, type(None)),
    "executor": (str,), "workers": (int, type(None)), "ray_address": (str, type(None)),
    "store": (str,), "backend": (str,), "tensorboard": (str, type(None)), "command": (str,),
    "reproduce": (str,), "created": (str,), "versions": (dict,), "task": (str, type(None)),
    "device": (str, type(None)), "task_digest": (str, type(None)), "tiers": (list, type(None)),
}
_OPTIONAL_KEYS = ("task", "device", "task_digest", "tiers")
_PATH_KEYS = ("out", "grammar", "seed_programs", "store", "tensorboard")
_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", dict: "an object",
               bool: "true or false", type(None): "null"}


def _epilog() -> str:
    """--help's closing text: each preset's sizes and time limit, and where to go next."""
    rows = []
    for name, d in PRESET_DEFAULTS.items():
        limit = d[modes.DEFAULT.name]["time_limit"]
        sizes = ", ".join(f"{m.title} {d[m.name]['population']}x{d[m.name]['generations']}"
                          for m in MODES.values())
        rows.append(f"  {name:<7} {sizes}, time limit "
                    + ("none" if limit is None else f"{limit:.0f} s"))
    return ("presets (population x generations, per-candidate time limit):\n"
            + "\n".join(rows) + "\n\n"
            "Ctrl-C saves and prints the command that resumes the run. Watch or inspect a run "
            "with:\n  python -m engine.show RUN_DIR")


def build_parser() -> argparse.ArgumentParser:
    """engine.run's flags, in --help's order: what to run and where (here), then the search
    and how candidates train (`_search_and_training_flags`), then the search options."""
    presets = "/".join(PRESET_DEFAULTS)
    p = Parser(
        prog="python -m engine.run",
        description="Evolve a neural-network optimizer (ALR) or learning-rate schedule (DLR)\n"
                    "with grammatical evolution. With no flags: the quick ALR preset into a new\n"
                    "directory under runs/, which the run prints.",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=tuple(MODES), default=None,
                   help="alr: a per-weight optimizer; dlr: an SGD learning-rate schedule "
                        f"(default: {modes.DEFAULT.name})")
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help=f"task and search size, {presets}; see below (default: quick)")
    p.add_argument("--task", default=None, metavar="TASK",
                   help="what candidates train on: a built-in task (" + ", ".join(FAMILIES)
                        + ") or FILE.py:CALLABLE / MODULE:CALLABLE returning an "
                        "engine.tasks.SupervisedTask (default: the preset's fmnist-cnn)")
    p.add_argument("--device", choices=DEVICES, default=None,
                   help="where the model and data train, a preset's CNN or a --task's "
                        "(default: cuda when there is a GPU, else cpu)")
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="take flags from a TOML or JSON file (keys are flag names, or a run's "
                        "config.json); flags on the command line override it")
    p.add_argument("--seed", type=_seed, default=None,
                   help="seed of the search and of the data split, 0 to 2**63 - 1 (default: 0)")
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
    _search_and_training_flags(p)
    add_search_flags(p)
    return p


def _search_and_training_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--generations", type=positive_int, default=None,
                   help="generations, the initial population included (default: the preset's)")
    p.add_argument("--population", type=positive_int, default=None,
                   help="population size (default: the preset's)")
    p.add_argument("--grammar", type=Path, default=None,
                   help="BNF grammar file (default: "
                        f"{' or '.join(m.grammar.name for m in MODES.values())} in "
                        "engine/evolution/grammars)")
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
    p.add_argument("--tiers", type=_tiers, default=None, metavar="on|off|TIERS",
                   help="score candidates through the fidelity-tier funnel (a micro training "
                        "for all, the preset's training for the best; default: on for ALR on "
                        "the presets' task), train every candidate (off), or the funnel with "
                        "these tiers: a JSON list of tier tables or a .json file holding one "
                        "(lr_scales, normalise and several tasks per tier: README, 'Tiers'); "
                        "fixed for the run")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="kernel backend for ALR candidates (default: auto: triton on CUDA, "
                        "numba on the CPU)")
    p.add_argument("--tensorboard", type=Path, default=None, metavar="DIR",
                   help="also log each generation (fitness, outcome counts, seconds, the best "
                        "program) to TensorBoard in DIR; needs the tensorboard package "
                        "(default: off)")


# -- settings ----------------------------------------------------------------------------------


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


def _load_grammar(path: Path, mode: Mode) -> Grammar:
    try:
        grammar = load_grammar(path)
    except GrammarError as err:
        raise UsageError(str(err)) from None
    # A grammar for the other mode would make every candidate a parse error: say so now.
    import random

    from engine.evolution.sge import initialise

    sample = initialise(grammar, random.Random(0), 1, max(grammar.shortest[grammar.start], 6))
    try:
        mode.parse(sample.phenotype)
    except (ParseError, ValueError) as err:
        raise UsageError(f"{path}: its phenotypes are not {mode.programs} (--mode {mode.name}), "
                         f"e.g. {sample.phenotype[:60]!r}: {' '.join(str(err).split())}") from None
    return grammar


def _task_label(task: str | None) -> str | None:
    """A task reference as a run directory's name takes it: the file's or callable's stem."""
    if task is None:
        return None
    where, _, attr = task.rpartition(":")
    return task if not where else Path(where).stem.split(".")[-1] if attr == "task" else attr


def _task_reference(task: str | None) -> str | None:
    """--task as the run records it: None for the presets' CNN, a built-in name as typed, a
    file reference made absolute (workers elsewhere, and a resume from elsewhere, find it)."""
    if task is None or is_builtin_cnn(task):
        return None
    if task in FAMILIES:
        return task
    try:
        return absolute(task)
    except TaskError as err:
        raise UsageError(str(err)) from None


def new_config(args: argparse.Namespace, argv: list[str]) -> RunConfig:
    mode, preset = modes.get(args.mode or modes.DEFAULT), args.preset or "quick"
    seed = 0 if args.seed is None else args.seed
    d = PRESET_DEFAULTS[preset][mode.name]
    population = args.population or d["population"]
    try:
        evolution = EvolutionConfig(
            population=population, generations=args.generations or d["generations"],
            elitism=min(d["elitism"], population - 1), tournament=min(d["tournament"], population),
            p_cross=d.get("p_cross", 0.9), p_mut=d.get("p_mut", 0.15),
            min_depth=d["min_depth"], max_depth=d["max_depth"], seed=seed,
            **search_settings(args))
    except ValueError as err:
        raise UsageError(str(err)) from None
    grammar_path = args.grammar or mode.grammar
    grammar = _load_grammar(grammar_path, mode)
    seed_lr = DEFAULT_SEED_LR if args.seed_lr is None else args.seed_lr
    programs = mode.zoo_seeds() if args.seed_zoo is not False else []
    try:
        if args.seed_programs is not None:
            programs += read_seed_file(args.seed_programs, seed_lr)
        seeds = snap_all(programs, grammar, mode, evolution.max_depth)
    except SeedError as err:
        raise UsageError(str(err)) from None
    if len(seeds) > population:
        raise UsageError(f"{len(seeds)} seed programs do not fit in a population of "
                         f"{population}; raise --population or seed fewer")
    task = _task_reference(args.task)
    out = args.out or _fresh_dir(mode.name, _task_label(task) or preset, seed)
    reproduce = reproduce_args(args, mode.name, preset, evolution, seed_lr, task)
    # The micro tier trains ALR programs and is calibrated against the presets' CNN only.
    funnel = args.tiers != "off" and mode.tiered and task is None
    if isinstance(args.tiers, list):
        funnel = True
    elif args.tiers == "on" and not funnel:
        raise UsageError("--tiers on: the funnel's micro tier is calibrated for ALR programs on "
                         "the presets' Fashion-MNIST task; this run trains every candidate "
                         "(drop --tiers)")
    check_refine_constants(evolution, grammar, grammar_path, funnel)
    try:
        return RunConfig(
            name=out.name, out=out, mode=mode, preset=preset, seed=seed, evolution=evolution,
            grammar=Path(grammar_path).resolve(), grammar_text=grammar.text, seeds=seeds,
            seed_zoo=args.seed_zoo is not False, seed_programs=args.seed_programs,
            seed_lr=seed_lr,
            time_limit=args.time_limit if args.time_limit is not None else d["time_limit"],
            time_budget=args.time_budget, executor=args.executor or "local",
            workers=args.workers, ray_address=args.ray_address,
            store=(args.store or _default_store()).expanduser().resolve(),
            backend=args.backend or "auto",
            tensorboard=None if args.tensorboard is None else
            args.tensorboard.expanduser().resolve(),
            command=shlex.join(["python", "-m", "engine.run", *argv]),
            reproduce=shlex.join(["python", *reproduce]),
            created=datetime.now().astimezone().isoformat(timespec="seconds"),
            versions=versions(), task=task, device=args.device,
            tiers=(args.tiers if isinstance(args.tiers, list) else
                   default_tiers(preset) if funnel else None))
    except ValueError as err:
        raise UsageError(str(err)) from None


def resumed_config(args: argparse.Namespace, out: Path) -> RunConfig:
    """The saved run's settings with what --resume may change applied; it continues in `out`
    (a copied or moved run continues where it now is)."""
    path = out / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--resume: {out} holds no run to resume (no checkpoint and no "
                         "config.json); start a run there without --resume") from None
    except (OSError, ValueError) as err:
        raise UsageError(f"--resume: cannot read {path} ({err})") from None
    try:
        config = RunConfig.from_json(data, source=str(path))
    except ValueError as err:
        raise UsageError(f"--resume: {err}") from None
    fixed = {"mode": config.mode.name, "preset": config.preset, "seed": config.seed,
             "population": config.evolution.population, "seed_zoo": config.seed_zoo,
             "device": config.device,
             **{name: getattr(config.evolution, name) for name in SEARCH_OPTIONS}}
    given_task = None if is_builtin_cnn(args.task) else args.task
    if args.task is not None and given_task not in (config.task, None) \
            and absolute(given_task) != config.task:
        raise UsageError(f"--resume: --task {args.task} differs from the run's "
                         f"{config.task or 'fmnist-cnn'}; only {', '.join(RESUMABLE)} may change")
    for name, saved in fixed.items():
        given = getattr(args, name)
        if given is not None and given != saved:
            raise UsageError(f"--resume: --{name.replace('_', '-')} {given} differs from the "
                             f"run's {'unset' if saved is None else saved}; only "
                             f"{', '.join(RESUMABLE)} may change")
    if args.tiers is not None and (
            (args.tiers == "off") != (config.tiers is None)
            or isinstance(args.tiers, list) and args.tiers != config.tiers):
        raise UsageError(f"--resume: --tiers {args.tiers} differs from the run's "
                         f"{'off' if config.tiers is None else 'on'}; only "
                         f"{', '.join(RESUMABLE)} may change")
    if args.grammar is not None or args.seed_programs is not None or args.seed_lr is not None:
        raise UsageError("--resume: the run keeps the grammar and seed programs it started "
                         f"with (saved in {out}/config.json); drop --grammar/--seed-programs")
    changes = {name: getattr(args, name) for name in RESUMABLE if getattr(args, name) is not None}
    try:
        return config.resumed(out=out, **changes)
    except ValueError as err:
        raise UsageError(str(err)) from None
