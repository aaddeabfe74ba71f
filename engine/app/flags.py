"""How engine.run's flag values are read and checked (durations, seeds, the search options), and
the flags that reproduce a run.

The search options (`--p-mut-const`, `--remutate`, `--niche-cap`, `--restart-after`,
`--refine-constants`) are the
`EvolutionConfig` fields that change the search away from the original system
(engine/evolution/diversity.py). They are off unless given, so a run without them replays bit
for bit; given, they are saved in config.json's `evolution` and, like the population, cannot
change on --resume (the checkpoint's identity includes them).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable

from engine.app.cli import UsageError, integer
from engine.evolution.evolve import EvolutionConfig
from engine.evolution.grammar import Grammar
from engine.modes import Mode

__all__ = ["MAX_SEED", "SEARCH_OPTIONS", "add_search_flags", "check_refine_constants",
           "check_seed", "duration",
           "remutate_same", "reproduce_args", "search_settings", "seed", "tiers", "check_tiers"]

# EvolutionConfig's search options, in the order --help lists them.
SEARCH_OPTIONS = ("p_mut_const", "remutate", "niche_cap", "restart_after", "refine_constants")

MAX_SEED = 2**63 - 1  # the store keeps seeds as SQLite INTEGERs (64-bit, signed)


def duration(text: str) -> float:
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


def tiers(text: str) -> str | list[dict]:
    """--tiers: 'on', 'off', or the tiers themselves: a JSON list of tier tables (inline, or a
    .json file holding one), each as engine.fitness.tiers.Tier.to_json writes it."""
    if text in ("on", "off"):
        return text
    from pathlib import Path

    source = text
    if not text.lstrip().startswith("["):
        try:
            source = Path(text).read_text(encoding="utf-8")
        except OSError as err:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not on, off, a JSON list of tiers or a readable file holding one "
                f"({err.strerror or err})") from None
    try:
        data = json.loads(source)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--tiers: not valid JSON ({err})") from None
    return check_tiers(data)


def check_tiers(data: object) -> list[dict]:
    """A list of tier tables, each checked by building its Tier; a ValueError naming the bad
    one otherwise."""
    from engine.fitness.tiers import Tier

    if not isinstance(data, list) or not data or not all(isinstance(t, dict) for t in data):
        raise argparse.ArgumentTypeError("--tiers: a non-empty list of tier tables, e.g. "
                                         '[{"name": "quick", "tasks": ["quick"]}]')
    try:
        checked = [Tier.from_json(t).to_json() for t in data]
    except (KeyError, TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"--tiers: {err}") from None
    names = [t["name"] for t in checked]
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"--tiers: tier names must be distinct, got {names}")
    return checked


def seed(text: str) -> int:
    try:
        return check_seed(integer(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def check_seed(value: int) -> int:
    """A run's seed: checked before anything is written, because a seed the store cannot hold
    (>= 2**63) failed only at its first lookup, leaving a run directory that neither a retry nor
    --resume would take; a negative one made every training raise."""
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"{value} is out of range: a seed is an integer from 0 to {MAX_SEED} "
                         "(2**63 - 1)")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"{text!r} is not a probability in [0, 1]")
    return value


def _count(text: str) -> int:
    value = integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 (off) or a positive count")
    return value


def add_search_flags(p: argparse.ArgumentParser) -> None:
    """The search options' flags; each defaults to None (not given: the field's default, off)."""
    p.add_argument("--p-mut-const", type=_probability, default=None, metavar="P",
                   help="mutation rate of constants, --p-mut's preset rate then applying to "
                        "structure only (default: off, the same rate for both)")
    p.add_argument("--remutate", type=_count, default=None, metavar="N",
                   help="mutate a child that behaves like its parent (the mode's behavioural "
                        "fingerprint) again, up to N times (default: 0, off)")
    p.add_argument("--niche-cap", type=_count, default=None, metavar="N",
                   help="at most N members of a population share a structure (constants left "
                        "out) (default: 0, off)")
    p.add_argument("--restart-after", type=_count, default=None, metavar="G",
                   help="after G generations without a better best, restart from the hall of "
                        "fame plus random individuals (default: 0, off)")
    p.add_argument("--refine-constants", type=_count, default=None, metavar="K",
                   help="after each generation, a short local search on the free constants of "
                        "the K best candidates promoted past the micro tier, once per structure "
                        "(needs a grammar with free constants, e.g. alr_ext.bnf) (default: 0, "
                        "off)")


def check_refine_constants(evolution: EvolutionConfig, grammar: Grammar, grammar_path: object,
                           funnel: bool) -> None:
    """--refine-constants only where it can refine something: free constants to move (the
    paper grammar's come from a table, which mutation already walks) and a funnel whose
    promotions choose the candidates. A UsageError otherwise, before anything is written."""
    if not evolution.refine_constants:
        return
    if not grammar.has_free_constants:
        raise UsageError(f"--refine-constants: {grammar_path} has no free constants (a rule "
                         "'<x> ::= %float') to refine; use --grammar "
                         "engine/evolution/grammars/alr_ext.bnf or drop --refine-constants")
    if not funnel:
        raise UsageError("--refine-constants refines candidates the funnel promoted past its "
                         "first tier, and this run has no funnel (--tiers off, --mode dlr or "
                         "--task); drop --refine-constants")


def search_settings(args: argparse.Namespace) -> dict:
    """The EvolutionConfig fields the flags give (only those given)."""
    return {name: getattr(args, name) for name in SEARCH_OPTIONS
            if getattr(args, name, None) is not None}


def reproduce_args(args: argparse.Namespace, mode: str, preset: str,
                   evolution: EvolutionConfig, seed_lr: float, task: str | None) -> list[str]:
    """The arguments after `python` that start this run again from scratch (config.json's
    `reproduce`); a search option appears only when it is on, so older runs' lines stay."""
    reproduce = ["-m", "engine.run", "--mode", mode, "--preset", preset, "--seed",
                 str(evolution.seed), "--population", str(evolution.population),
                 "--generations", str(evolution.generations)]
    defaults = EvolutionConfig()
    for name in SEARCH_OPTIONS:
        value = getattr(evolution, name)
        if value != getattr(defaults, name):
            reproduce += ["--" + name.replace("_", "-"), repr(value)]
    if args.grammar:
        reproduce += ["--grammar", str(args.grammar)]
    if args.seed_programs:
        reproduce += ["--seed-programs", str(args.seed_programs), "--seed-lr", repr(seed_lr)]
    if args.seed_zoo is False:
        reproduce.append("--no-seed-zoo")
    if task is not None:
        reproduce += ["--task", task]
    if args.device is not None:
        reproduce += ["--device", args.device]
    if args.tiers == "off":
        reproduce += ["--tiers", "off"]
    elif isinstance(args.tiers, list):
        reproduce += ["--tiers", json.dumps(args.tiers, separators=(",", ":"))]
    return reproduce


def remutate_same(mode: Mode, preset: str, evolution: EvolutionConfig) \
        -> Callable[[str], str] | None:
    """What --remutate compares a child with its parent by: the mode's behavioural fingerprint
    (the screening's, for ALR), so that a child computing what its parent did is mutated again
    even when its text differs; None (evolve's canonical program) when --remutate is off."""
    if not evolution.remutate:
        return None

    def same(text: str) -> str:
        try:
            return mode.behaviour(mode.parse(text), preset)
        except ValueError:  # not a program of the mode: its text is all there is to compare
            return text

    return same
