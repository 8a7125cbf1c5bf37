"""Command-line arguments that are checked where they are parsed: one line per mistake, exit code 2.

`OneLineParser` is argparse without the usage block on an error (`PROG: error: argument --k: must be an
integer >= 1, got '0'`); `integer(minimum)` and `number(minimum, inclusive)` are `type=` converters that
refuse what would otherwise run and print nonsense (`--k 0`, `--temperature 0`, `--lr nan`,
`--batch-size 0`, `--workers -1`). Used by every command of pipeline/ and train/ (preprocess has its own,
older checks with the same one-line form).
"""
from __future__ import annotations

import argparse
import math


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def integer(minimum: int):
    """`type=` for an int >= `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def number(minimum: float, inclusive: bool = False):
    """`type=` for a finite float > `minimum` (>= with `inclusive`)."""
    relation = ">=" if inclusive else ">"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"must be a finite number {relation} {minimum:g}, got {text!r}")
        return value

    parse.__name__ = f"number {relation} {minimum:g}"
    return parse
