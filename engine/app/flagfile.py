"""`--config FILE`: a run's flags from a TOML or JSON file, such as a previous run's config.json.

Flags given on the command line override the file's. Every value is parsed by the command's own
parser, so a value in a file is checked exactly as the same flag typed by hand.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from engine.app.cli import UsageError
from engine.app.config import FORMAT
from engine.app.flags import SEARCH_OPTIONS

__all__ = ["read_config_file", "with_config_file"]


# A run's config.json key -> the flag it came from; the rest (name, out, texts, stamps) belong
# to that run alone.
_RUN_FLAGS = ("mode", "preset", "seed", "grammar", "seed_programs", "seed_lr", "seed_zoo",
              "time_limit", "time_budget", "executor", "workers", "ray_address", "store",
              "backend", "tensorboard", "task", "device", "tiers")


def read_config_file(path: Path) -> dict:
    """A --config file's flags: TOML (by its .toml suffix) or JSON; a run's config.json gives
    the flags that started it (not its directory: a new run gets its own)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise UsageError(f"--config {path}: cannot read it ({err.strerror or err})") from None
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as err:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise UsageError(f"--config {path}: not valid {kind} ({' '.join(str(err).split())})") \
            from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: holds a {type(data).__name__}, not a table of flags")
    if data.get("format") == FORMAT:
        run = data
        data = {k: run[k] for k in _RUN_FLAGS if run.get(k) is not None}
        evolution = run.get("evolution") or {}
        data.update({k: evolution[k] for k in ("population", "generations", *SEARCH_OPTIONS)
                     if k in evolution})
    return data


def with_config_file(parser: argparse.ArgumentParser, args: argparse.Namespace) \
        -> argparse.Namespace:
    """`args` with every flag it leaves unset taken from --config FILE, parsed by the same
    parser (so a file's value is checked as the flag's would be)."""
    if getattr(args, "config", None) is None:
        return args
    flags = {a.dest: a for a in parser._actions if a.option_strings}
    argv: list[str] = []
    for key, value in read_config_file(args.config).items():
        dest = str(key).replace("-", "_")
        if dest not in flags or dest in ("config", "help"):
            raise UsageError(f"--config {args.config}: unknown flag {key!r} (see --help)")
        flag = flags[dest].option_strings[0]
        if isinstance(value, bool):
            if isinstance(flags[dest], argparse.BooleanOptionalAction):
                argv.append(flag if value else "--no-" + flag[2:])
            elif value:
                argv.append(flag)
        elif isinstance(value, list):  # --tiers given as a list of tables
            argv += [flag, json.dumps(value)]
        elif value is not None:
            argv += [flag, str(value)]
    try:
        from_file = parser.parse_args(argv)
    except UsageError as err:
        raise UsageError(f"--config {args.config}: {err}") from None
    for dest, value in vars(from_file).items():
        default = parser.get_default(dest)  # left at its default on the command line: the file's
        if getattr(args, dest) == default and value != default:
            setattr(args, dest, value)
    return args
