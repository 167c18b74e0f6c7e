"""The order in which benchmark segments run: ranks interleaved across repetitions (ABCABC, not AAABBB),
so slow drift of the device (heating, background load) spreads over every rank instead of one."""

from __future__ import annotations


def interleaved(ranks: list[int], repetitions: int) -> list[tuple[int, int]]:
    """[(repetition, rank), ...]: all ranks in the given order, once per repetition."""
    if repetitions < 1:
        raise ValueError("repetitions must be >= 1")
    return [(rep, rank) for rep in range(repetitions) for rank in ranks]
