"""Energy over a timed window from a power source, honestly labelled.

A sampler thread reads the source at `rate_hz` (default 10 Hz, clamped to the source's own
maximum); one reading is taken just before the window opens and one just after it closes.
- Power sources (watts): the power is the piecewise-linear curve through the samples, and
  joules = its integral over exactly [t0, t1] (trapezoids; values at t0 and t1 interpolated).
- Cumulative sources (energy counters, RAPL): each counter is unwrapped (a decrease means it
  passed its wrap value), interpolated at t0 and t1, and joules = E(t1) - E(t0).
`measure_idle` records idle power first; results then carry idle_w and
joules_above_idle = joules - idle_w * seconds in their own column.
Every result is one of measured, estimated or unavailable; aggregates never mix them.

    meter = meter_for("/")        # best source now, else a labelled estimate, else unavailable
    meter.measure_idle(5.0)
    meter.start(); work(); result = meter.stop()      # EnergyResult; result.to_json() for reports
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

from edge_client.device.host import Host
from edge_client.device.sources import choose_source, discover_sources, estimate_source
from edge_client.device.sources.base import PowerSource, Unreadable
from edge_client.device.identity import read_identity
from edge_client.device.profile import catalog_power_figure, match_catalog

STATUSES = ("measured", "estimated", "unavailable")


def interpolate(times: Sequence[float], values: Sequence[float], t: float) -> float:
    """Linear interpolation of (times, values) at t; times ascending and t within their span."""
    if not times[0] <= t <= times[-1]:
        raise ValueError(f"t={t} is outside the sampled span [{times[0]}, {times[-1]}]")
    i = bisect.bisect_right(times, t)
    if i == len(times):
        return values[-1]
    t_a, t_b = times[i - 1], times[i]
    return values[i - 1] + (values[i] - values[i - 1]) * (t - t_a) / (t_b - t_a)


def integrate_power(times: Sequence[float], watts: Sequence[float], t0: float, t1: float) -> float:
    """Joules: integral over [t0, t1] of the piecewise-linear power through the samples (trapezoids)."""
    inside = [(t, w) for t, w in zip(times, watts) if t0 < t < t1]
    points = [(t0, interpolate(times, watts, t0)), *inside, (t1, interpolate(times, watts, t1))]
    return sum((tb - ta) * (wa + wb) / 2 for (ta, wa), (tb, wb) in zip(points, points[1:]))


def unwrap(counts: Sequence[int], wrap: int | None) -> list[int]:
    """A cumulative counter with its wraparounds undone: every decrease adds `wrap`."""
    out, offset = [counts[0]], 0
    for prev, cur in zip(counts, counts[1:]):
        if cur < prev:
            if wrap is None:
                raise ValueError("the energy counter went backwards and its wrap value is unknown")
            offset += wrap
        out.append(cur + offset)
    return out


def counter_energy(times: Sequence[float], counters: Sequence[Sequence[int]], wraps: Sequence[int | None],
                   t0: float, t1: float) -> float:
    """Summed counter increase over [t0, t1] (units of the counters), interpolated at the edges."""
    total = 0.0
    for zone, wrap in enumerate(wraps):
        series = unwrap([c[zone] for c in counters], wrap)
        total += interpolate(times, series, t1) - interpolate(times, series, t0)
    return total


@dataclass(frozen=True)
class EnergyResult:
    """Energy of one timed window (or an aggregate of windows with identical labels)."""

    energy_status: str  # measured | estimated | unavailable
    scope: str | None  # module | board | package | battery | estimate
    source: str | None
    seconds: float
    joules: float | None
    sample_count: int
    sample_rate_hz: float | None
    idle_w: float | None = None
    joules_above_idle: float | None = None
    model: str | None = None  # the named model of an estimate
    note: str | None = None  # why a figure is unavailable

    @property
    def mean_w(self) -> float | None:
        return self.joules / self.seconds if self.joules is not None and self.seconds > 0 else None

    def to_json(self) -> dict:
        return {**asdict(self), "mean_w": self.mean_w}


def combine(results: Sequence[EnergyResult]) -> EnergyResult:
    """Sum windows measured the same way; refuses to mix statuses, scopes or sources."""
    if not results:
        raise ValueError("nothing to combine")
    labels = {(r.energy_status, r.scope, r.source, r.model) for r in results}
    if len(labels) > 1:
        raise ValueError(f"refusing to aggregate energy figures with different labels: {sorted(map(str, labels))}")
    first = results[0]
    seconds = sum(r.seconds for r in results)
    samples = sum(r.sample_count for r in results)

    def total(values):
        return None if any(v is None for v in values) else sum(values)

    return replace(first, seconds=seconds, joules=total([r.joules for r in results]), sample_count=samples,
                   sample_rate_hz=samples / seconds if seconds > 0 else None,
                   joules_above_idle=total([r.joules_above_idle for r in results]),
                   idle_w=first.idle_w if len({r.idle_w for r in results}) == 1 else None)


class EnergyMeter:
    """Measures the energy of timed windows from one source: `start()`, work, `stop()` -> EnergyResult.

    With `source=None` every result is "unavailable" with `unavailable_note`. `clock` and
    `start(background=False)` let a caller drive the samples itself (tests, replay).
    """

    def __init__(self, source: PowerSource | None, rate_hz: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, unavailable_note: str | None = None):
        if rate_hz <= 0:
            raise ValueError("rate_hz must be positive")
        self.source = source
        self.rate_hz = min(rate_hz, source.max_rate_hz) if source else rate_hz
        self.clock = clock
        self.unavailable_note = unavailable_note or "no power source can measure this device"
        self.idle_w: float | None = None
        self.times: list[float] = []
        self.values: list = []
        self.missed = 0
        self._t0: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def status(self) -> str:
        return self.source.status if self.source else "unavailable"

    def sample(self) -> None:
        """One reading, time-stamped at the middle of the read."""
        if self.source is None:
            return
        before = self.clock()
        try:
            value = self.source.read()
        except Unreadable:
            self.missed += 1
            return
        self.times.append((before + self.clock()) / 2)
        self.values.append(value)

    def _loop(self) -> None:
        period = 1.0 / self.rate_hz
        next_t = self.clock() + period
        while not self._stop.wait(max(0.0, next_t - self.clock())):
            self.sample()
            next_t = max(next_t + period, self.clock())

    def start(self, background: bool = True) -> None:
        if self._t0 is not None:
            raise RuntimeError("the meter is already running")
        self.times, self.values, self.missed = [], [], 0
        self.sample()
        self._t0 = self.clock()
        if background and self.source is not None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="energy-sampler", daemon=True)
            self._thread.start()

    def stop(self) -> EnergyResult:
        if self._t0 is None:
            raise RuntimeError("the meter is not running")
        t0, t1 = self._t0, self.clock()
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.sample()
        self._t0 = None
        return self._result(t0, t1)

    def _result(self, t0: float, t1: float) -> EnergyResult:
        seconds, n = t1 - t0, len(self.times)
        span = self.times[-1] - self.times[0] if n > 1 else 0.0
        rate = (n - 1) / span if span > 0 else None
        labels = dict(energy_status=self.status, scope=self.source.scope if self.source else None,
                      source=self.source.name if self.source else None, seconds=seconds, sample_count=n,
                      sample_rate_hz=rate, model=self.source.model if self.source else None)
        if self.source is None:
            return EnergyResult(**{**labels, "energy_status": "unavailable"}, joules=None, note=self.unavailable_note)
        try:
            joules = self._joules(t0, t1)
        except ValueError as exc:
            return EnergyResult(**{**labels, "energy_status": "unavailable"}, joules=None,
                                note=f"{self.source.name}: {exc} ({self.missed} readings failed)")
        above = joules - self.idle_w * seconds if self.idle_w is not None else None
        return EnergyResult(**labels, joules=joules, idle_w=self.idle_w, joules_above_idle=above)

    def _joules(self, t0: float, t1: float) -> float:
        if len(self.times) < 2 or not self.times[0] <= t0 <= t1 <= self.times[-1]:
            raise ValueError("too few readings to cover the window")
        if self.source.cumulative:
            return counter_energy(self.times, self.values, self.source.ranges, t0, t1) * self.source.counter_joules
        return integrate_power(self.times, self.values, t0, t1)

    def measure_idle(self, seconds: float, sleep: Callable[[float], None] = time.sleep) -> float | None:
        """Idle power in watts over `seconds` of doing nothing; later results subtract it."""
        self.idle_w = None
        self.start()
        sleep(seconds)
        result = self.stop()
        self.idle_w = result.mean_w
        return self.idle_w


def meter_for(host: Host | str | os.PathLike = "/", *, catalog_id: str | None = None,
              rate_hz: float = 10.0, user_watts: float | None = None) -> EnergyMeter:
    """A meter on the best source this device can measure with now; else an estimate from the user's
    full-load figure (`user_watts`, P = user_watts x CPU utilisation), the catalog's figure for the
    device (matched by identity unless `catalog_id` is given) or the RAPL power limit; else an
    always-unavailable meter whose note says why."""
    host = Host.of(host)
    if user_watts is not None:
        estimate = estimate_source(host, {"idle_w": 0.0, "load_w": user_watts}, "--watts")
    else:
        catalog_id = catalog_id or match_catalog(read_identity(host))
        estimate = estimate_source(host, catalog_power_figure(catalog_id), f"catalog:{catalog_id}")
    source, passed_over = choose_source(discover_sources(host), estimate)
    note = ("no power source can measure this device and no estimate figure is known; pass --watts W "
            "(its full-load power) for an estimate")
    if passed_over:
        note += f" ({'; '.join(passed_over)})"
    return EnergyMeter(source, rate_hz, unavailable_note=note)
