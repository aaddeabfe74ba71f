"""What the command-line tools share: one-line usage errors (exit status 2) and argument types."""

from __future__ import annotations

import argparse


class UsageError(Exception):
    """A mistake the user can fix: shown as one line on stderr, exit status 2, no traceback."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are UsageErrors: one line, not argparse's usage block."""

    def error(self, message: str):
        raise UsageError(f"{message} (see --help)")


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def positive_int(text: str) -> int:
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value
