"""argparse value types shared by the subcommands."""

from __future__ import annotations

import argparse
import sys

from hetlora.protocol.energy import watts_problem


def positive_int_list(text: str) -> tuple[int, ...]:
    """"4,8,16" -> (4, 8, 16); argparse's one-line error for anything else (a non-integer, a value below 1)."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def watts(text: str) -> float:
    """A device's training power in watts (`hetlora client --watts`): argparse's one-line error unless it is a
    finite number in hetlora.protocol.energy's MIN_WATTS..MAX_WATTS."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of watts, got {text!r}") from None
    problem = watts_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


class _OldSpelling(argparse.Action):
    """A flag's former spelling: stores into the new flag's dest and warns once, in one line."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"hetlora: warning: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_renamed(container, new: str, old: str, **kwargs) -> argparse.Action:
    """Add flag `new` (argparse.add_argument's `kwargs`) to a parser or group, with `old` as a hidden deprecated
    alias: the same value, and a one-line warning on stderr when it is used (one spelling per flag across the
    commands: docs/ARCHITECTURE.md)."""
    action = container.add_argument(new, **kwargs)
    container.add_argument(old, dest=action.dest, type=action.type, choices=action.choices, metavar=action.metavar,
                           action=_OldSpelling, new=new, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return action
