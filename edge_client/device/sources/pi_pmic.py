"""Raspberry Pi 5 PMIC rails via `vcgencmd pmic_read_adc`. Scope: the board.

Output lines look like `VDD_CORE_A current(7)=2.06600000A` and `VDD_CORE_V volt(15)=0.72188000V`;
currents and voltages are paired by rail name and P = sum V * I. Rails without a partner
(EXT5V_V, BATT_V) are left out. USB and HAT loads are not included. Needs the `video` group;
the firmware answers about 10 times a second at most.
"""

from __future__ import annotations

import re

from edge_client.device.host import Host
from edge_client.device.sources.base import PowerSource, Unreadable

COMMAND = ["vcgencmd", "pmic_read_adc"]
_LINE = re.compile(r"^\s*(\S+)_([AV])\s+(?:current|volt)\(\d+\)=([-+0-9.eE]+)[AV]\s*$")


def parse_pmic(text: str) -> dict[str, float]:
    """Rail -> watts for every rail with both a current and a voltage line."""
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        match = _LINE.match(line)
        if match:
            rail, kind, value = match.groups()
            (amps if kind == "A" else volts)[rail] = float(value)
    return {rail: amps[rail] * volts[rail] for rail in sorted(amps.keys() & volts.keys())}


class Pi5PmicSource(PowerSource):
    name, scope, units, path = "pi5-pmic", "board", "A*V", "vcgencmd pmic_read_adc"
    max_rate_hz = 10.0

    def __init__(self, host: Host):
        self.host = host

    def rails(self) -> dict[str, float]:
        rails = parse_pmic(self.host.run(COMMAND) or "")
        if not rails:
            raise Unreadable("`vcgencmd pmic_read_adc` gave no rail readings (Pi 5 only; needs the video group)")
        return rails

    def read(self) -> float:
        return sum(self.rails().values())


def discover_pi_pmic(host: Host) -> list[PowerSource]:
    source = Pi5PmicSource(host)
    return [source] if source.readable() else []
