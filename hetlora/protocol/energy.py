"""A round's training energy as a client reports it in its upload `meta`: measured seconds, ESTIMATED joules.

    meta["energy"] = {"seconds": s, "watts": w, "watts_source": src, "joules": w * s, "estimated": true}

`seconds` is the wall time of the local training (busy time: not the download, the upload or the waiting).
`joules` is not measured: it is the power figure `watts` times `seconds`. `watts_source` says where the figure
came from: "--watts" (the operator's `hetlora client --watts`), "catalog:<device id>" (the catalog's
`power.typical_training_w` of the device the profile names) or "unknown" (watts and joules null).
`energy_of(meta)` is the check both the HTTP server and the Flower strategy run (WireFormatError
`bad_metadata` naming the field); `round_energy` is a round's history entry.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from hetlora.protocol.wire import WireFormatError

MAX_SECONDS = 7 * 24 * 3600.0  # one round's local training: at most a week
MIN_WATTS, MAX_WATTS = 1e-3, 10_000.0  # far below and above any edge device (a Jetson AGX Orin peaks near 60 W)
UNKNOWN = "unknown"
_SOURCE = re.compile(r"--watts|catalog:[a-z0-9][a-z0-9._-]{0,63}|unknown")
_KEYS = {"seconds", "watts", "watts_source", "joules", "estimated"}


@dataclass(frozen=True)
class Power:
    """The power figure a client's estimates use: `watts` (None: unknown) and where it came from."""

    watts: float | None = None
    source: str = UNKNOWN

    def report(self, seconds: float) -> dict:
        """meta["energy"] for a training of `seconds`: joules = watts x seconds (null when watts is)."""
        joules = None if self.watts is None else self.watts * seconds
        return {"seconds": seconds, "watts": self.watts, "watts_source": self.source, "joules": joules,
                "estimated": True}


def watts_problem(watts: float) -> str | None:
    """Why `watts` cannot be a device's training power (not finite, outside MIN_WATTS..MAX_WATTS), or None."""
    if not math.isfinite(watts) or not MIN_WATTS <= watts <= MAX_WATTS:
        return f"watts must be a finite number in {MIN_WATTS:g}..{MAX_WATTS:g}, got {watts}"
    return None


def _number(value, field: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise WireFormatError("bad_metadata", f"metadata energy.{field} must be a finite number in {low:g}..{high:g}, "
                              f"got {str(value)[:40]}")
    return float(value)


def energy_of(meta: dict) -> dict | None:
    """The upload's checked energy report (None when the client sent none; older clients do not): the keys of
    `Power.report`, estimated true, seconds in 0..MAX_SECONDS, watts in MIN_WATTS..MAX_WATTS or null exactly when the
    source is "unknown", joules null with watts, else equal to watts x seconds (relative 1e-6)."""
    if "energy" not in meta:
        return None
    doc = meta["energy"]
    if not isinstance(doc, dict) or set(doc) != _KEYS or doc["estimated"] is not True:
        raise WireFormatError("bad_metadata", f"metadata energy must be an object with exactly {sorted(_KEYS)} and "
                              "estimated true")
    source = doc["watts_source"]
    if not isinstance(source, str) or not _SOURCE.fullmatch(source):
        raise WireFormatError("bad_metadata", "metadata energy.watts_source must be '--watts', 'catalog:<device id>' "
                              f"or 'unknown', got {str(source)[:40]!r}")
    seconds = _number(doc["seconds"], "seconds", 0.0, MAX_SECONDS)
    if source == UNKNOWN:
        if doc["watts"] is not None or doc["joules"] is not None:
            raise WireFormatError("bad_metadata", "metadata energy: watts and joules must be null when the "
                                  "watts_source is 'unknown'")
        return Power().report(seconds)
    watts = _number(doc["watts"], "watts", MIN_WATTS, MAX_WATTS)
    joules = _number(doc["joules"], "joules", 0.0, MAX_WATTS * MAX_SECONDS)
    if not math.isclose(joules, watts * seconds, rel_tol=1e-6, abs_tol=1e-9):
        raise WireFormatError("bad_metadata", f"metadata energy.joules {joules:g} is not watts x seconds "
                              f"({watts:g} x {seconds:g})")
    return Power(watts, source).report(seconds) | {"joules": joules}


def round_energy(reports: dict[str, dict | None]) -> dict:
    """A round's energy in its history: each client's report (null: none sent), the totals of the known joules
    and of the seconds, and the clients whose joules are unknown (then the total is a lower bound)."""
    known = [r["joules"] for r in reports.values() if r is not None and r["joules"] is not None]
    return {"estimated": True, "clients": dict(reports), "joules": sum(known),
            "seconds": sum(r["seconds"] for r in reports.values() if r is not None),
            "unknown": [c for c, r in reports.items() if r is None or r["joules"] is None]}
