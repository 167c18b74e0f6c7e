"""Driving an energy meter by hand: scripted clock instants instead of real time."""

from __future__ import annotations

from edge_client.device.energy import EnergyMeter


def scripted_clock(values):
    """A clock that returns the given instants in order (one per call)."""
    it = iter(values)
    return lambda: next(it)


def drive(meter: EnergyMeter, set_state, times, window):
    """Run a meter by hand: a reading at times[0], the window opening, readings at the inner
    times, the window closing, and a last reading at times[-1]. Returns the result."""
    t0, t1 = window
    inner = times[1:-1]
    clock_values = [times[0], times[0], t0] + [v for t in inner for v in (t, t)] + [t1, times[-1], times[-1]]
    meter.clock = scripted_clock(clock_values)
    set_state(times[0])
    meter.start(background=False)
    for t in inner:
        set_state(t)
        meter.sample()
    set_state(times[-1])
    return meter.stop()
