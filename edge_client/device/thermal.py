"""Thermal zones: /sys/class/thermal/thermal_zone*/{type,temp}, temp in millidegrees Celsius.

Zones whose temperature cannot be read (disabled zones return an error) are left out. Jetson's
"PMIC-Die" zone reports a fixed 100 C placeholder, so it is listed but not counted in max_c.
"""

from __future__ import annotations

from edge_client.device.host import Host

NOT_A_TEMPERATURE = ("PMIC-Die",)


def read_thermal(host: Host, battery_c: float | None = None) -> dict:
    """The profile's "thermal" section: {"zones": {type: celsius}, "max_c": hottest real zone}.

    `battery_c` (from the battery readers) becomes a "battery" zone when no zone is readable,
    as on phones where SELinux hides the thermal zones from apps.
    """
    zones: dict[str, float] = {}
    for zone in sorted(host.glob("/sys/class/thermal/thermal_zone[0-9]*"), key=lambda p: int(p.name[12:] or 0)):
        millidegrees = host.read_int(zone / "temp")
        if millidegrees is None:
            continue
        name = host.read(zone / "type") or zone.name
        if name in zones:
            name = f"{name}.{zone.name[12:]}"
        zones[name] = millidegrees / 1000
    if not zones and battery_c is not None:
        zones["battery"] = battery_c
    counted = [c for name, c in zones.items() if not name.startswith(NOT_A_TEMPERATURE)]
    return {"zones": zones, "max_c": max(counted, default=None)}
