"""Battery power as a source (scope battery): laptop and Android sysfs, and termux-battery-status.

It measures the device only while the battery supplies it, so on external power the source
reports itself unusable. Units and sign conventions: see edge_client.device.battery.
"""

from __future__ import annotations

from pathlib import Path

from edge_client.device import battery
from edge_client.device.host import Host
from edge_client.device.sources.base import PowerSource, Unreadable

ON_EXTERNAL_POWER = "on external power: battery power measures the device only while unplugged"


class SysfsBatterySource(PowerSource):
    name, scope = "battery-sysfs", "battery"
    max_rate_hz = 10.0

    def __init__(self, host: Host, directory: Path):
        self.host, self.directory, self.path = host, directory, str(directory)
        self.units = "uW" if (directory / "power_now").exists() else "uA*uV"

    def read(self) -> float:
        watts = battery.sysfs_power_w(self.host, self.directory)
        if watts is None:
            raise Unreadable(f"cannot read power_now or current_now/voltage_now under {self.directory}")
        return watts

    def unusable_reason(self) -> str | None:
        state = battery.read_sysfs_battery(self.host, self.directory)
        return ON_EXTERNAL_POWER if state is None or state["power_w"] is None else None


class TermuxBatterySource(PowerSource):
    name, scope, units, path = "termux-battery", "battery", "uA*mV", "termux-battery-status"
    max_rate_hz = 2.0  # each call goes through the Termux:API app

    def __init__(self, host: Host):
        self.host = host

    def read(self) -> float:
        status = battery.termux_status(self.host)
        watts = battery.termux_power_w(status) if status else None
        if watts is None:
            raise Unreadable("termux-battery-status gave no current and voltage (install Termux:API)")
        return watts

    def unusable_reason(self) -> str | None:
        status = battery.termux_status(self.host)
        return ON_EXTERNAL_POWER if not status or battery.read_termux_battery(status)["power_w"] is None else None


def discover_battery(host: Host) -> list[PowerSource]:
    found: list[PowerSource] = [SysfsBatterySource(host, d) for d in battery.sysfs_batteries(host)]
    if battery.termux_status(host) is not None:
        found.append(TermuxBatterySource(host))
    return found
