"""An estimated power source for devices that cannot measure: a named linear model of CPU load.

    P = idle_w + (load_w - idle_w) * u,   u = busy fraction of all CPUs since the previous reading

from /proc/stat. Two ways to fill it: a per-device figure from the catalog (idle and full-load
watts), or a TDP fraction (idle_w = 0, load_w = TDP, e.g. the RAPL package power limit).
Readings are labelled estimated and never mix with measurements.
"""

from __future__ import annotations

from edge_client.device.host import Host
from edge_client.device.sources.base import PowerSource, Unreadable


def cpu_times(host: Host) -> tuple[int, int]:
    """(busy, total) jiffies from the aggregate "cpu" line of /proc/stat (idle + iowait are idle)."""
    line = (host.read("/proc/stat") or "").partition("\n")[0].split()
    if not line or line[0] != "cpu":
        raise Unreadable("cannot read the cpu line of /proc/stat")
    ticks = [int(v) for v in line[1:9]]  # user nice system idle iowait irq softirq steal
    total = sum(ticks)
    return total - ticks[3] - ticks[4], total


class EstimateSource(PowerSource):
    scope, status, units, path = "estimate", "estimated", "W", "/proc/stat"
    max_rate_hz = 10.0

    def __init__(self, host: Host, load_w: float, idle_w: float, model: str):
        self.host, self.load_w, self.idle_w = host, float(load_w), float(idle_w)
        self.name = "estimate"
        self.model = model
        self._last = cpu_times(host)
        self._utilisation = 0.0

    @classmethod
    def tdp_fraction(cls, host: Host, tdp_w: float, origin: str) -> EstimateSource:
        return cls(host, tdp_w, 0.0, f"tdp-fraction: P = {tdp_w:g} W x CPU utilisation (TDP from {origin})")

    @classmethod
    def device_figure(cls, host: Host, idle_w: float, load_w: float, origin: str) -> EstimateSource:
        return cls(host, load_w, idle_w,
                   f"device-figure: P = {idle_w:g} W + ({load_w:g} - {idle_w:g}) W x CPU utilisation ({origin})")

    def utilisation(self) -> float:
        """Busy fraction since the previous reading (the previous value when no tick has passed)."""
        busy, total = cpu_times(self.host)
        last_busy, last_total = self._last
        if total > last_total:
            self._last = (busy, total)
            self._utilisation = (busy - last_busy) / (total - last_total)
        return self._utilisation

    def read(self) -> float:
        return self.idle_w + (self.load_w - self.idle_w) * self.utilisation()

    def describe(self) -> dict:
        return {**super().describe(), "model": self.model}
