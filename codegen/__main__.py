"""`python -m codegen show PROGRAM_OR_FILE --backend BACKEND`: print a generated kernel.

PROGRAM_OR_FILE is program text (lines `alpha: ...`, `weight: ...`, or the one-line form with `;`
between them) or the path of a file holding it. Bad text or a path that cannot be read: one line
on stderr saying why, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from codegen.backends import BACKENDS
from codegen.cache import source
from codegen.ir import ParseError, Program

EXAMPLE = "'weight: mul(0.01, grad)'"


class ArgumentError(ValueError):
    """The argument is neither program text nor a readable program file."""


def read_program_arg(arg: str) -> str:
    """Program text from a file path, or the argument itself (program text always has a ':')."""
    if not arg.strip():
        raise ArgumentError(f"the program is empty: give its text (like {EXAMPLE}) or a file "
                            "holding it")
    if "\n" in arg or ":" in arg.split("/")[0]:
        return arg
    path = Path(arg)
    try:
        if path.is_dir():
            raise ArgumentError(f"{arg} is a directory: give a program file or program text "
                                f"(like {EXAMPLE})")
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArgumentError(f"no such program file: {arg} (program text has a ':', like "
                            f"{EXAMPLE})") from None
    except UnicodeDecodeError as exc:
        raise ArgumentError(f"{arg} is not a program file: not UTF-8 text (byte "
                            f"{exc.object[exc.start]:#04x} at offset {exc.start})") from None
    except OSError as exc:
        raise ArgumentError(f"cannot read the program file {arg}: {exc.strerror or exc}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m codegen", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="print the generated kernel source for a program")
    show.add_argument("program", help="program text, or a file holding it")
    show.add_argument("--backend", choices=tuple(BACKENDS), default="numba")
    args = parser.parse_args(argv)
    try:
        program = Program.parse(read_program_arg(args.program))
    except (ParseError, ArgumentError) as exc:
        # One line: a ParseError's own message names line and column; its echo of the text and
        # the caret under it would repeat a long program whole.
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    sys.stdout.write(source(program, args.backend))
    return 0


if __name__ == "__main__":
    sys.exit(main())
