"""The interface every power source implements, and the error a failed reading raises."""

from __future__ import annotations

SCOPES = ("module", "board", "package", "battery", "estimate")


class Unreadable(Exception):
    """A reading could not be taken (file missing or denied, command failed)."""


class PowerSource:
    """Where the device's power or energy can be read.

    `read()` returns watts, or for a cumulative source (`cumulative = True`) a tuple of raw
    counters (in `units`, `counter_joules` J each) whose wrap values are `ranges`; it raises Unreadable on failure.
    `status` is "measured", or "estimated" for a model (then `model` names it).
    """

    name: str = ""
    scope: str = ""
    units: str = ""
    path: str = ""
    max_rate_hz: float = 10.0
    status: str = "measured"
    cumulative: bool = False
    model: str | None = None
    ranges: tuple[int | None, ...] = ()
    counter_joules: float = 1.0  # joules per counter unit

    def read(self):
        raise NotImplementedError

    def unusable_reason(self) -> str | None:
        """Why readings would not measure the device right now (e.g. battery on external power)."""
        return None

    def readable(self) -> bool:
        try:
            self.read()
        except Unreadable:
            return False
        return True

    def describe(self) -> dict:
        """The profile's "power_sources" entry."""
        return {"name": self.name, "scope": self.scope, "path": self.path, "units": self.units,
                "readable": self.readable(), "status": self.status, "max_rate_hz": self.max_rate_hz}
