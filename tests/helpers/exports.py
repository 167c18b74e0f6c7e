"""The session's `hetlora export` runs: each in its own process, one at a time on a background thread.

An export of a tiny model keeps one core busy for a minute or more, and most of the suite needs none. The session
starts the exports its tests need before its first test (tests/conftest.py), and the modules that use them run
last, so the exports run beside the other tests instead of holding them up; a fixture waits for its export.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
TIMEOUT = 1800  # a hang guard, not a time limit


class Exports:
    """Named exports: `prepare(name)` gives one's (folder, `hetlora export` arguments); `start` queues it once,
    `result` waits for it (queuing it first if need be), `close` ends the session's exports still running."""

    def __init__(self, prepare: Callable[[str], tuple[Path, list[str]]]):
        self._prepare = prepare
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="export")
        self._jobs: dict[str, tuple[Path, Future]] = {}
        self._lock = threading.Lock()
        self._running: subprocess.Popen | None = None
        self._closed = False

    def start(self, name: str) -> None:
        if name not in self._jobs:
            folder, argv = self._prepare(name)
            self._jobs[name] = folder, self._pool.submit(self._run, argv)

    def result(self, name: str) -> tuple[Path, subprocess.CompletedProcess]:
        """(artifacts folder, the finished `hetlora export` process); fails the caller if the export failed."""
        self.start(name)
        folder, job = self._jobs[name]
        proc = job.result()
        assert proc.returncode == 0, proc.stderr[-3000:]
        return folder, proc

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "hetlora.cli", "export", *argv]
        with self._lock:
            if self._closed:
                return subprocess.CompletedProcess(cmd, -1, "", "the session ended before this export started")
            self._running = proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                                    cwd=PROJECT)
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._running is not None and self._running.poll() is None:
                self._running.kill()  # an export no test of this session waited for
        self._pool.shutdown(wait=True, cancel_futures=True)
