"""A Flower federation on this machine: one SuperLink and SuperNodes as real processes, and `flwr run`.

For tests, benchmarks and trying the app before a fleet exists. Everything listens on 127.0.0.1 without
TLS (`--insecure`); docs/FLOWER.md shows the TLS and SuperNode-authentication setup for real devices.
Every process starts in its own process group, and `stop` ends each group (SIGTERM, then SIGKILL), which
takes the `flower-superexec`, ServerApp and ClientApp processes they spawned along.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr: the same environment's scripts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_config_arg(config: dict) -> str:
    """A --node-config / --run-config value: key=value pairs, strings quoted as TOML strings."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        return repr(v) if isinstance(v, (int, float)) else '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
    return " ".join(f"{k}={value(v)}" for k, v in config.items())


class LocalFederation:
    """Start with `superlink()`, `supernode(...)` per node, then `run(...)`; always `stop()` (or use `with`)."""

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.processes: list[subprocess.Popen] = []
        self.port: int | None = None
        self.env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                        FLWR_HOME=str(self.workdir / "flwr-home"), PYTHONUNBUFFERED="1")

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir,
                                start_new_session=True)
        log.close()
        self.processes.append(proc)
        return proc

    def superlink(self, simulation: bool = False) -> int:
        """Start the SuperLink on a free port, wait until it answers, write the `local` connection; the port."""
        self.port = free_port()
        argv = [str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                "--host", "127.0.0.1", "--port", str(self.port)] + (["--simulation"] if simulation else [])
        proc = self._start("superlink", argv)
        _wait_for_port(self.port, proc, self.workdir / "superlink.log")
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                          f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        return self.port

    def supernode(self, name: str, node_config: dict) -> subprocess.Popen:
        """Start one SuperNode connected to the SuperLink, with its own ClientApp port and node config."""
        argv = [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                "--port", str(free_port()), "--node-config", node_config_arg(node_config)]
        return self._start(f"supernode-{name}", argv)

    def run(self, app_dir: str | os.PathLike, run_config: dict, timeout: float,
            federation_config: dict | None = None) -> subprocess.CompletedProcess:
        """`flwr run APP local --stream` with run-config overrides; returns when the run ends (or at timeout)."""
        argv = [str(BIN / "flwr"), "run", str(app_dir), "local", "--stream",
                "--run-config", node_config_arg(run_config)]
        if federation_config:
            argv += ["--federation-config", node_config_arg(federation_config)]
        with open(self.workdir / "flwr-run.log", "wb") as log:
            return subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir,
                                  timeout=timeout, check=False)

    def members(self) -> list:
        """Every live process of this federation: those started here and all they spawned, found by this
        federation's FLWR_HOME in their environment (Ray's daemons leave the process groups)."""
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.environ().get("FLWR_HOME") == self.env["FLWR_HOME"]:
                    found.append(proc)
            except (psutil.Error, OSError):
                continue
        return found

    def stop(self) -> None:
        """End every process group started here (SIGTERM, up to 10 s, then SIGKILL), then any member left."""
        for proc in self.processes:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)  # children of an exited leader may still run
            proc.wait()
        self.processes = []
        for member in self.members():
            with contextlib.suppress(psutil.Error):
                member.kill()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the SuperLink exited ({proc.returncode}); see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the SuperLink did not listen on port {port} within {timeout:g} s; see {log}")
