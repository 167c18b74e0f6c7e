"""The machine being profiled: files under a root directory and the external commands on its PATH.

Every reader in `edge_client.device` takes a `Host`, so tests point it at a fake `/sys` + `/proc`
tree and a folder of fake executables (`vcgencmd`, `getprop`, `termux-battery-status`).
Reads never raise for a missing or unreadable file: they return None (the field is unknown).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

Runner = Callable[[list[str]], "str | None"]


@dataclass(frozen=True)
class Host:
    """A root directory (default "/"), the environment, and an optional command runner override."""

    root: Path = Path("/")
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    runner: Runner | None = None
    command_timeout_s: float = 10.0

    @classmethod
    def of(cls, root_or_host: "Host | str | os.PathLike") -> "Host":
        """A Host as given, or the Host of a root directory with this process's environment."""
        return root_or_host if isinstance(root_or_host, Host) else cls(Path(root_or_host))

    @property
    def live(self) -> bool:
        """True when this is the running machine (root "/"), so process-level facts apply."""
        return Path(self.root).resolve() == Path("/")

    def path(self, absolute: str) -> Path:
        return Path(self.root) / absolute.lstrip("/")

    def glob(self, pattern: str) -> list[Path]:
        """Sorted matches of an absolute glob pattern under the root."""
        return sorted(Path(self.root).glob(pattern.lstrip("/")))

    def exists(self, absolute: str) -> bool:
        return self.path(absolute).exists()

    def read(self, path: str | Path) -> str | None:
        """Text of a file (absolute path under the root, or a Path from `glob`), stripped of
        whitespace and device-tree NULs; None when missing or unreadable."""
        full = path if isinstance(path, Path) else self.path(path)
        try:
            return full.read_bytes().decode("utf-8", "replace").replace("\x00", "").strip()
        except OSError:
            return None

    def read_int(self, path: str | Path) -> int | None:
        text = self.read(path)
        try:
            return int(text) if text is not None else None
        except ValueError:
            return None

    def run(self, argv: list[str]) -> str | None:
        """stdout of an external command, or None when it is missing, fails or times out."""
        if self.runner is not None:
            return self.runner(argv)
        exe = shutil.which(argv[0], path=self.env.get("PATH", os.defpath))
        if exe is None:
            return None
        try:
            done = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, env=dict(self.env),
                                  timeout=self.command_timeout_s, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None
