"""Real `hetlora serve` (forked, start_server) and `hetlora client` processes (simulation.fleet) on loopback, run to
the end."""

from __future__ import annotations

import csv
import json
import os
import signal
import time
from pathlib import Path

from edge_client.server_api import ServerAPI
from tests.conftest import ARTIFACT_LABELS

LABELS = list(ARTIFACT_LABELS)
WORDS = {"card": "my card was declined at the shop", "transfer": "send money to my friend abroad",
         "rate": "what is the exchange rate today"}


def write_data(path, rows: int, offset: int = 0):
    """A classification CSV of `rows` rows cycling through LABELS (starting at `offset`)."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for i in range(rows):
            label = LABELS[(i + offset) % 3]
            w.writerow([f"{WORDS[label]} {i}", label])
    return path


def serve_args(model_dir, labels_file, aggregator, rounds=2, steps=3, head_rounds=0):
    return ["--head-rounds", str(head_rounds), "--model", str(model_dir), "--task", "classification", "--labels",
            str(labels_file), "--aggregator", aggregator, "--ranks", "2,4,8", "--rounds", str(rounds), "--min-clients",
            "3", "--local-steps", str(steps), "--batch-size", "4", "--seq-len", "16", "--poll-seconds", "0.2",
            "--round-deadline", "300"]


class ForkedServer:
    """A `hetlora serve` forked from the test process (tests.helpers.server.fork_serve: the same command without a
    second import of torch and transformers), stopped as simulation.fleet.Process is: SIGTERM, then SIGKILL."""

    def __init__(self, proc):
        self.proc = proc

    def stop(self, timeout: float = 10) -> None:
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.join(timeout)
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.join()


def start_server(serve_args: list[str], state_dir: Path) -> tuple[ForkedServer, str]:
    """simulation.fleet.start_server's `hetlora serve` on loopback, forked (ForkedServer), logging to
    <state_dir>.log beside its state folder; (server, URL) once it answers."""
    from tests.helpers.server import fork_serve

    state_dir = Path(state_dir)
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    proc, url = fork_serve([*serve_args, "--host", "127.0.0.1"], state_dir,
                           stderr=state_dir.parent / f"{state_dir.name}.log")
    return ForkedServer(proc), url


def wait_finished(api: ServerAPI, procs, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = api.status()
        if status["finished"]:
            return status
        for p in procs:
            assert p.alive() or p.wait() == 0, p.tail()
        time.sleep(0.5)
    raise AssertionError("run did not finish: " + json.dumps(api.status()["round"]))


def run_to_end(server, url, start_clients, restart=None) -> dict:
    """Start the clients, let `restart(clients)` replace some of them (a restarted client), wait until the
    run finishes and every client exits 0; stop everything started. Returns the final status."""
    clients = []
    try:
        clients = start_clients()
        if restart is not None:
            restart(clients)
        status = wait_finished(ServerAPI(url), clients)
        for c in clients:
            assert c.wait(timeout=60) == 0, c.tail()
        return status
    finally:
        for c in clients:
            c.stop()
        server.stop()
