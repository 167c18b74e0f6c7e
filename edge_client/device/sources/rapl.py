"""Intel/AMD RAPL: /sys/class/powercap/intel-rapl:N/energy_uj, cumulative microjoules.

Each counter wraps at its max_energy_range_uj. energy_uj is readable only by root on most
kernels since 2020 and absent in many containers and VMs. Top-level zones are the CPU packages
("package-N", summed, scope package) and, on some laptops, the whole platform ("psys", board).
"""

from __future__ import annotations

from pathlib import Path

from edge_client.device.host import Host
from edge_client.device.sources.base import PowerSource, Unreadable

ZONES = "/sys/class/powercap/intel-rapl:[0-9]*"


class RaplSource(PowerSource):
    cumulative = True
    units = "uJ"
    counter_joules = 1e-6
    max_rate_hz = 100.0

    def __init__(self, host: Host, zones: list[Path], name: str, scope: str):
        self.host, self.zones, self.name, self.scope = host, zones, name, scope
        self.path = ",".join(str(z) for z in zones)
        self.ranges = tuple(host.read_int(z / "max_energy_range_uj") for z in zones)

    def read(self) -> tuple[int, ...]:
        values = tuple(self.host.read_int(z / "energy_uj") for z in self.zones)
        if None in values:
            raise Unreadable(f"cannot read energy_uj under {self.path} (root only on most kernels)")
        return values


def discover_rapl(host: Host) -> list[RaplSource]:
    """One source for the summed CPU packages, and one for psys when present."""
    top = [z for z in host.glob(ZONES) if z.name.count(":") == 1]
    packages = [z for z in top if (host.read(z / "name") or "").startswith("package")]
    psys = [z for z in top if host.read(z / "name") == "psys"]
    found = [RaplSource(host, packages, "rapl", "package")] if packages else []
    if psys:
        found.append(RaplSource(host, psys, "rapl-psys", "board"))
    return found


def rapl_power_limit_w(host: Host) -> float | None:
    """Sum of the packages' long-term power limits (constraint 0): a TDP figure for estimates.

    These files stay readable when energy_uj is root-only."""
    limits = [host.read_int(z / "constraint_0_power_limit_uw") for z in host.glob(ZONES)
              if (host.read(z / "name") or "").startswith("package")]
    return sum(limits) / 1e6 if limits and all(limits) else None
