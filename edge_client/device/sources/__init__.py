"""Power sources: what a device offers to measure its power or energy, and the estimate fallback.

`discover_sources(host)` lists the measurable sources, best first; `choose_source` picks the one
a meter should use now; `estimate_source` builds the labelled fallback when none can measure.
"""

from __future__ import annotations

import os

from edge_client.device.host import Host
from edge_client.device.sources.base import PowerSource, Unreadable
from edge_client.device.sources.battery_power import discover_battery
from edge_client.device.sources.estimate import EstimateSource
from edge_client.device.sources.jetson import discover_jetson
from edge_client.device.sources.pi_pmic import discover_pi_pmic
from edge_client.device.sources.rapl import discover_rapl, rapl_power_limit_w

__all__ = ["PowerSource", "Unreadable", "EstimateSource", "discover_sources", "choose_source", "estimate_source"]


def discover_sources(host: Host | str | os.PathLike = "/") -> list[PowerSource]:
    """Every measured source the device has, widest scope first: module/board sensors, RAPL, battery."""
    host = Host.of(host)
    return [*discover_jetson(host), *discover_pi_pmic(host), *discover_rapl(host), *discover_battery(host)]


def estimate_source(host: Host | str | os.PathLike, device_figure: dict | None = None,
                    origin: str = "catalog") -> EstimateSource | None:
    """The fallback model: a device figure {"idle_w", "load_w"} if given, else the RAPL package
    power limit as TDP; None when neither is known."""
    host = Host.of(host)
    try:
        if device_figure and device_figure.get("idle_w") is not None and device_figure.get("load_w") is not None:
            return EstimateSource.device_figure(host, device_figure["idle_w"], device_figure["load_w"], origin)
        tdp_w = rapl_power_limit_w(host)
        return EstimateSource.tdp_fraction(host, tdp_w, "RAPL package power limit") if tdp_w else None
    except Unreadable:
        return None


def choose_source(sources: list[PowerSource], estimate: PowerSource | None = None) -> tuple[PowerSource | None, list[str]]:
    """The first source that is readable and usable now, else the estimate; plus why others were passed over."""
    passed_over = []
    for source in sources:
        if not source.readable():
            passed_over.append(f"{source.name}: not readable")
            continue
        reason = source.unusable_reason()
        if reason:
            passed_over.append(f"{source.name}: {reason}")
            continue
        return source, passed_over
    return estimate, passed_over
