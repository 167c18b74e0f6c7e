"""Jetson INA3221 power monitors, in both sysfs layouts. Scope: the module.

JetPack 4 (iio): /sys/bus/i2c/drivers/ina3221x/*/iio:device*/rail_name_N, in_power{N}_input (mW).
JetPack 5/6 (hwmon): /sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/in{N}_label, in{N}_input (mV),
curr{N}_input (mA), P = V * I. The "sum of shunt voltages" channel and "NC" (not connected)
channels are skipped. The module's input rail (VDD_IN, or POM_5V_IN on the Nano) is its total;
boards without one (AGX Orin) are the sum of their rails. The Nano 2GB has no sensor.
"""

from __future__ import annotations

import re
from pathlib import Path

from edge_client.device.host import Host
from edge_client.device.sources.base import PowerSource, Unreadable

TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")
IIO_DEVICES = "/sys/bus/i2c/drivers/ina3221x/*/iio:device*"
HWMON_DEVICES = "/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*"


def module_power_w(rails: dict[str, float]) -> float:
    """The input rail when present (the module total), else the sum of all rails."""
    for total in TOTAL_RAILS:
        if total in rails:
            return rails[total]
    return sum(rails.values())


def skipped_label(label: str) -> bool:
    return label.lower() == "sum of shunt voltages" or "NC" in re.split(r"[^A-Za-z0-9]+", label)


class _JetsonSource(PowerSource):
    scope = "module"
    max_rate_hz = 50.0

    def __init__(self, host: Host, channels: dict[str, tuple[Path, ...]]):
        self.host, self.channels = host, channels
        self.path = ",".join(sorted({str(p.parent) for files in channels.values() for p in files}))

    def rail_watts(self, files: tuple[Path, ...]) -> float:
        raise NotImplementedError

    def rails(self) -> dict[str, float]:
        """Rail name -> watts."""
        return {name: self.rail_watts(files) for name, files in self.channels.items()}

    def read(self) -> float:
        return module_power_w(self.rails())

    def _int(self, path: Path) -> int:
        value = self.host.read_int(path)
        if value is None:
            raise Unreadable(f"cannot read {path}")
        return value

    def describe(self) -> dict:
        return {**super().describe(), "rails": sorted(self.channels)}


class JetsonIioSource(_JetsonSource):
    """JetPack 4 layout; rail power in mW."""

    name, units = "jetson-ina3221-iio", "mW"

    def rail_watts(self, files: tuple[Path, ...]) -> float:
        return self._int(files[0]) / 1e3


class JetsonHwmonSource(_JetsonSource):
    """JetPack 5/6 layout; rail voltage in mV times current in mA."""

    name, units = "jetson-ina3221-hwmon", "mV*mA"

    def rail_watts(self, files: tuple[Path, ...]) -> float:
        return self._int(files[0]) * self._int(files[1]) / 1e6


def discover_jetson(host: Host) -> list[PowerSource]:
    iio: dict[str, tuple[Path, ...]] = {}
    for device in host.glob(IIO_DEVICES):
        for rail_file in sorted(device.glob("rail_name_*")):
            n = rail_file.name.rsplit("_", 1)[1]
            label = host.read(rail_file)
            if label and not skipped_label(label):
                iio[label] = (device / f"in_power{n}_input",)
    hwmon: dict[str, tuple[Path, ...]] = {}
    for device in host.glob(HWMON_DEVICES):
        for label_file in sorted(device.glob("in*_label")):
            n = label_file.name[2:-len("_label")]
            label = host.read(label_file)
            if label and not skipped_label(label):
                hwmon[label] = (device / f"in{n}_input", device / f"curr{n}_input")
    found: list[PowerSource] = []
    if iio:
        found.append(JetsonIioSource(host, iio))
    if hwmon:
        found.append(JetsonHwmonSource(host, hwmon))
    return found
