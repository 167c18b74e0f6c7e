"""Latency statistics of a list of step times (pure functions)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100), linear between closest ranks: position (n - 1) * q / 100
    in the sorted values (numpy's default "linear" method)."""
    if not values:
        raise ValueError("percentile of an empty list")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within [0, 100], got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation with n - 1; 0 for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean of an empty list")
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def summarize(seconds: Sequence[float]) -> dict:
    """{"n", "p50_s", "p90_s", "p99_s", "mean_s", "std_s"} of step times in seconds."""
    mean, std = mean_std(seconds)
    return {"n": len(seconds), "p50_s": percentile(seconds, 50), "p90_s": percentile(seconds, 90),
            "p99_s": percentile(seconds, 99), "mean_s": mean, "std_s": std}
