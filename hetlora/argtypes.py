"""argparse value types shared by the subcommands."""

from __future__ import annotations

import argparse


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
    from hetlora.protocol.energy import watts_problem

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of watts, got {text!r}") from None
    problem = watts_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value
