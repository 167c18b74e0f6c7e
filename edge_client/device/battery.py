"""Battery state: /sys/class/power_supply (laptops, Android) or `termux-battery-status` (Termux).

sysfs units: capacity %, power_now uW, current_now uA, voltage_now uV. termux-battery-status:
current uA, voltage mV. The sign of the current differs between vendors, so power is |I| * V.
Battery power says what the device draws only while it runs on the battery, so power_w is
reported only when discharging (None otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path

from edge_client.device.host import Host

POWER_SUPPLY = "/sys/class/power_supply/*"
EXTERNAL_TYPES = ("Mains", "USB", "Wireless")  # USB covers USB_PD, USB_C, ... by prefix


def sysfs_batteries(host: Host) -> list[Path]:
    """System batteries (type Battery), not those of peripherals (scope Device, e.g. a mouse)."""
    return [d for d in host.glob(POWER_SUPPLY)
            if host.read(d / "type") == "Battery" and host.read(d / "scope") != "Device"]


def sysfs_plugged(host: Host) -> bool | None:
    """Whether an external supply is online; None when the device exposes none."""
    online = [host.read_int(d / "online") for d in host.glob(POWER_SUPPLY)
              if (host.read(d / "type") or "").startswith(EXTERNAL_TYPES)]
    known = [v for v in online if v is not None]
    return any(known) if known else None


def sysfs_power_w(host: Host, battery: Path) -> float | None:
    """|power_now| (uW), else |current_now| (uA) * voltage_now (uV), in watts."""
    power_uw = host.read_int(battery / "power_now")
    if power_uw is not None:
        return abs(power_uw) / 1e6
    current_ua, voltage_uv = host.read_int(battery / "current_now"), host.read_int(battery / "voltage_now")
    if current_ua is None or voltage_uv is None:
        return None
    return abs(current_ua) * abs(voltage_uv) / 1e12


def termux_status(host: Host) -> dict | None:
    """The JSON of `termux-battery-status`, or None when the command is missing or fails."""
    try:
        status = json.loads(host.run(["termux-battery-status"]) or "null")
    except json.JSONDecodeError:
        return None
    return status if isinstance(status, dict) else None


def termux_power_w(status: dict) -> float | None:
    """|current| (uA) * voltage (mV), in watts."""
    current_ua, voltage_mv = status.get("current"), status.get("voltage")
    if not isinstance(current_ua, (int, float)) or not isinstance(voltage_mv, (int, float)):
        return None
    return abs(current_ua) * abs(voltage_mv) / 1e9


def _state(percent, plugged, status: str | None, power_w, source: str) -> dict:
    status = (status or "").lower().replace("_", " ")
    if plugged is None and status in ("charging", "full", "not charging", "discharging"):
        plugged = status != "discharging"
    discharging = status == "discharging" or plugged is False
    return {"present": True, "percent": None if percent is None else float(percent), "plugged": plugged,
            "charging": status == "charging" if status else None,
            "power_w": power_w if discharging else None, "source": source}


def read_sysfs_battery(host: Host, battery: Path) -> dict | None:
    """None when the battery's files are unreadable (e.g. SELinux on Android)."""
    status, percent = host.read(battery / "status"), host.read_int(battery / "capacity")
    if status is None and percent is None:
        return None
    return _state(percent, sysfs_plugged(host), status, sysfs_power_w(host, battery), "sysfs")


def read_termux_battery(status: dict) -> dict:
    plugged = status.get("plugged")
    return _state(status.get("percentage"), None if plugged is None else plugged != "UNPLUGGED",
                  status.get("status"), termux_power_w(status), "termux")


def battery_temperature_c(host: Host) -> float | None:
    """The battery's temperature: sysfs `temp` (tenths of a degree), else termux's `temperature`."""
    for battery in sysfs_batteries(host):
        tenths = host.read_int(battery / "temp")
        if tenths is not None:
            return tenths / 10
    status = termux_status(host) or {}
    temperature = status.get("temperature")
    return float(temperature) if isinstance(temperature, (int, float)) else None


def read_battery(host: Host) -> dict:
    """The profile's "battery" section: sysfs first, then termux-battery-status, else absent."""
    for battery in sysfs_batteries(host):
        state = read_sysfs_battery(host, battery)
        if state is not None:
            return state
    status = termux_status(host)
    if status is not None:
        return read_termux_battery(status)
    return {"present": False, "percent": None, "plugged": None, "charging": None, "power_w": None,
            "source": "none"}
