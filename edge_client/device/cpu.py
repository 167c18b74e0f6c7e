"""CPU: usable cores, clock frequencies and throttling.

Throttling has two signals: (1) cpufreq below 90% of the CPU's maximum while the CPU is busy
(a `FrequencyWatcher` records the highest clock seen while a load runs); (2) on a Raspberry Pi,
`vcgencmd get_throttled`, whose bits are decoded into named reasons.
"""

from __future__ import annotations

import math
import os
import re

from edge_client.device import cgroup
from edge_client.device.host import Host
from edge_client.device.sampling import BackgroundSampler

THROTTLE_FRACTION = 0.9
CPUFREQ = "/sys/devices/system/cpu/cpu[0-9]*/cpufreq"

# `vcgencmd get_throttled` bits (Raspberry Pi firmware documentation).
THROTTLE_BITS = {
    0: "under-voltage now",
    1: "arm frequency capped now",
    2: "throttled now",
    3: "soft temperature limit now",
    16: "under-voltage has occurred",
    17: "arm frequency capping has occurred",
    18: "throttling has occurred",
    19: "soft temperature limit has occurred",
}
CURRENT_BITS = 0xF


def parse_cpu_list(text: str | None) -> set[int]:
    """'0-3,6' -> {0, 1, 2, 3, 6}."""
    cpus: set[int] = set()
    for part in (text or "").split(","):
        lo, _, hi = part.strip().partition("-")
        if lo.isdigit():
            cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def cgroup_cpu_quota(host: Host) -> float | None:
    """Tightest CPU bandwidth limit in cores (quota / period), from cpu.max (v2) or cfs_* (v1)."""
    quotas = []
    for d in cgroup.v2_dirs(host):
        fields = (host.read(d / "cpu.max") or "").split()
        if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit():
            quotas.append(int(fields[0]) / int(fields[1]))
    for d in cgroup.v1_dirs(host, "cpu"):
        quota, period = host.read_int(d / "cpu.cfs_quota_us"), host.read_int(d / "cpu.cfs_period_us")
        if quota and quota > 0 and period:
            quotas.append(quota / period)
    return min(quotas, default=None)


def count_cores(host: Host) -> int | None:
    """Online CPUs (this process's affinity on the live machine), capped by the cgroup CPU quota."""
    online = parse_cpu_list(host.read("/sys/devices/system/cpu/online"))
    cores = len(online) or None
    if host.live and hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    quota = cgroup_cpu_quota(host)
    if cores is not None and quota is not None:
        cores = max(1, min(cores, math.ceil(quota)))
    return cores


def _freqs_khz(host: Host, name: str) -> dict[str, int]:
    """cpuN -> value of cpufreq/<name> in kHz, for every CPU that has it."""
    values = {}
    for d in host.glob(CPUFREQ):
        value = host.read_int(d / name)
        if value:
            values[d.parent.name] = value
    return values


class FrequencyWatcher(BackgroundSampler):
    """Highest scaling_cur_freq per CPU seen while the `with` block runs (sampled in a thread)."""

    thread_name = "cpufreq-watcher"

    def __init__(self, host: Host, interval_s: float = 0.1):
        super().__init__(interval_s)
        self.host = host
        self.peaks_khz: dict[str, int] = {}

    def _sample(self) -> None:
        for cpu, khz in _freqs_khz(self.host, "scaling_cur_freq").items():
            self.peaks_khz[cpu] = max(khz, self.peaks_khz.get(cpu, 0))


def cpufreq_throttle_reasons(peaks_khz: dict[str, int], max_khz: dict[str, int]) -> list[str]:
    """One reason when some CPU never reached 90% of its maximum clock while busy."""
    low = [(peaks_khz[c] / max_khz[c], c) for c in peaks_khz if c in max_khz
           and peaks_khz[c] < THROTTLE_FRACTION * max_khz[c]]
    if not low:
        return []
    _, cpu = min(low)
    return [f"cpufreq below {THROTTLE_FRACTION:.0%} of max under load "
            f"({cpu}: {peaks_khz[cpu] / 1000:.0f} of {max_khz[cpu] / 1000:.0f} MHz)"]


def vcgencmd_throttled(host: Host) -> int | None:
    """The `vcgencmd get_throttled` bit field ('throttled=0x50005'), or None off a Pi."""
    match = re.search(r"throttled=(0x[0-9a-fA-F]+)", host.run(["vcgencmd", "get_throttled"]) or "")
    return int(match.group(1), 16) if match else None


def decode_throttled(bits: int) -> tuple[bool, list[str]]:
    """(throttled now, names of every set bit)."""
    return bool(bits & CURRENT_BITS), [name for bit, name in THROTTLE_BITS.items() if bits >> bit & 1]


def read_cpu(host: Host, load_peaks_khz: dict[str, int] | None = None) -> dict:
    """The profile's "cpu" section.

    `load_peaks_khz` (from a FrequencyWatcher around a busy load) enables the cpufreq throttle
    check and gives freq_mhz under load; without it freq_mhz is the current (idle) clock and
    only `vcgencmd` can report throttling. throttled is None when no check could run.
    """
    max_khz = _freqs_khz(host, "cpuinfo_max_freq")
    current = load_peaks_khz or _freqs_khz(host, "scaling_cur_freq")
    checks: list[bool] = []
    reasons: list[str] = []
    if load_peaks_khz and max_khz:
        freq_reasons = cpufreq_throttle_reasons(load_peaks_khz, max_khz)
        checks.append(bool(freq_reasons))
        reasons += freq_reasons
    bits = vcgencmd_throttled(host)
    if bits is not None:
        now, names = decode_throttled(bits)
        checks.append(now)
        reasons += names
    return {
        "cores": count_cores(host),
        "freq_mhz": max(current.values()) / 1000 if current else None,
        "max_freq_mhz": max(max_khz.values()) / 1000 if max_khz else None,
        "throttled": any(checks) if checks else None,
        "throttle_reasons": reasons,
    }
