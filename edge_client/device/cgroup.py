"""Control-group directories that limit this process (cgroup v2 unified, and v1 per controller).

The effective limit is the tightest one on the path from the process's own cgroup up to the
hierarchy root, so callers get every directory on that path that exists (leaf first).
"""

from __future__ import annotations

from pathlib import Path

from edge_client.device.host import Host

V2_MOUNTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")


def _own_paths(host: Host) -> dict[str, str]:
    """controller -> cgroup path of this process from /proc/self/cgroup ('' is the v2 entry)."""
    paths: dict[str, str] = {}
    for line in (host.read("/proc/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                paths[controller] = parts[2]
    return paths


def _leaf_to_root(base: Path, own: str | None) -> list[Path]:
    dirs = []
    if own:
        path = base / own.strip("/")
        while path != base and base in path.parents:
            dirs.append(path)
            path = path.parent
    dirs.append(base)
    return [d for d in dirs if d.is_dir()]


def v2_dirs(host: Host) -> list[Path]:
    own = _own_paths(host).get("")
    dirs: list[Path] = []
    for mount in V2_MOUNTS:
        base = host.path(mount)
        if (base / "cgroup.controllers").is_file():
            dirs += _leaf_to_root(base, own)
    return dirs


def v1_dirs(host: Host, controller: str) -> list[Path]:
    own = _own_paths(host).get(controller)
    return _leaf_to_root(host.path(f"/sys/fs/cgroup/{controller}"), own)
