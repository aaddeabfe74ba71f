"""`python -m codegen show PROGRAM_OR_FILE --backend numba|triton|torch`: print a generated kernel.

PROGRAM_OR_FILE is program text (lines `alpha: ...`, `weight: ...`; `\\n` or `;` may separate them
on a command line) or the path of a file holding it. Exit code 2 on bad text, with the parse error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from codegen.cache import BACKENDS, source
from codegen.ir import ParseError, Program


def read_program_arg(arg: str) -> str:
    """Program text from a file path, or the argument itself (`;` and `\\n` separate lines)."""
    path = Path(arg)
    if "\n" not in arg and ":" not in arg.split("/")[0] and path.exists():
        return path.read_text()
    if path.suffix in (".txt", ".alr", ".prog") and not path.exists():
        raise FileNotFoundError(f"no such program file: {arg}")
    return arg.replace("\\n", "\n").replace(";", "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m codegen", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="print the generated kernel source for a program")
    show.add_argument("program", help="program text, or a file holding it")
    show.add_argument("--backend", choices=BACKENDS, default="numba")
    args = parser.parse_args(argv)
    try:
        program = Program.parse(read_program_arg(args.program))
    except (ParseError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(source(program, args.backend))
    return 0


if __name__ == "__main__":
    sys.exit(main())
