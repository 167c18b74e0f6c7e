"""Memory: /proc/meminfo capped by the cgroup memory limit.

usable_bytes = min(MemAvailable, min over limiting cgroups of (limit - current usage)).
On Jetson the CPU and GPU share this DRAM.
"""

from __future__ import annotations

from edge_client.device import cgroup
from edge_client.device.host import Host

# cgroup v1 reports "no limit" as a huge page-aligned number (e.g. 9223372036854771712).
NO_LIMIT = 1 << 60


def meminfo(host: Host) -> dict[str, int]:
    """/proc/meminfo as bytes by key (values are in kB)."""
    values = {}
    for line in (host.read("/proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            values[key.strip()] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return values


def _limit(host: Host, path) -> int | None:
    text = host.read(path)
    if text is None or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value < NO_LIMIT else None


def cgroup_limits(host: Host) -> list[tuple[int, int | None]]:
    """(limit, current usage) of every cgroup on this process's path that sets a memory limit."""
    found = []
    for d in cgroup.v2_dirs(host):
        limit = _limit(host, d / "memory.max")
        if limit is not None:
            found.append((limit, host.read_int(d / "memory.current")))
    for d in cgroup.v1_dirs(host, "memory"):
        limit = _limit(host, d / "memory.limit_in_bytes")
        if limit is not None:
            found.append((limit, host.read_int(d / "memory.usage_in_bytes")))
    return found


def read_memory(host: Host) -> dict:
    """The profile's "memory" section."""
    info = meminfo(host)
    total, available = info.get("MemTotal"), info.get("MemAvailable")
    limits = cgroup_limits(host)
    limit = min((lim for lim, _ in limits), default=None)
    headroom = [lim - (used or 0) for lim, used in limits]  # unknown usage: the limit still bounds
    candidates = [v for v in (available, *headroom) if v is not None]
    return {
        "total_bytes": total,
        "available_bytes": available,
        "cgroup_limit_bytes": limit,
        "usable_bytes": max(0, min(candidates)) if candidates else None,
    }
