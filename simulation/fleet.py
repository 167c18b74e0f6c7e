"""Start a real server and real client processes on this machine (the demo and end-to-end tests).

Every process is a plain `hetlora serve` / `hetlora client` command, the same ones a user runs on
a laptop and on devices; their output goes to log files in the run folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hetlora.errors import UserError

HETLORA = [sys.executable, "-m", "hetlora.cli"]


def _env(threads: int | None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


class Process:
    """A `hetlora` subcommand in its own process group, logging to `log_path`."""

    def __init__(self, args: list[str], log_path: Path, threads: int | None = None):
        self.args, self.log_path = args, Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(HETLORA + args, stdout=self._log, stderr=subprocess.STDOUT, env=_env(threads),
                                     start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            os.killpg(self.proc.pid, sig)
            self.proc.wait(30)

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()

    def tail(self, lines: int = 20) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def start_server(serve_args: list[str], state_dir: Path, *, timeout: float = 120) -> tuple[Process, str]:
    """`hetlora serve` on a free loopback port; returns the process and its URL (from server.json)."""
    state_dir = Path(state_dir)
    info = state_dir / "server.json"
    info.unlink(missing_ok=True)
    proc = Process(["serve", *serve_args, "--state-dir", str(state_dir), "--host", "127.0.0.1", "--port", "0"],
                   state_dir.parent / f"{state_dir.name}.log")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if info.exists():
            try:
                return proc, json.loads(info.read_text())["url"]
            except (json.JSONDecodeError, KeyError):
                pass
        if not proc.alive():
            raise UserError(f"the server exited during start-up:\n{proc.tail()}")
        time.sleep(0.2)
    proc.stop()
    raise UserError(f"the server did not start within {timeout:.0f} s:\n{proc.tail()}")


def start_client(url: str, data: Path, state_dir: Path, extra: list[str], *, threads: int | None = 1) -> Process:
    args = ["client", "--server", url, "--data", str(data), "--state-dir", str(state_dir), "--no-progress", *extra]
    if threads:
        args += ["--threads", str(threads)]
    return Process(args, Path(state_dir).parent / f"{Path(state_dir).name}.log", threads=threads)
