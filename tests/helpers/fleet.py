"""Real `hetlora serve` and `hetlora client` processes on loopback (simulation.fleet), run to the end."""

from __future__ import annotations

import csv
import json
import time

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
