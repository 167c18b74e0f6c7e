"""End to end: a real `hetlora serve` and real `hetlora client` processes on loopback."""

from __future__ import annotations

import csv
import json
import re
import time

import pytest

from simulation.fleet import start_client, start_server
from edge_client.server_api import ServerAPI

LABELS = ["card", "transfer", "rate"]
WORDS = {"card": "my card was declined at the shop", "transfer": "send money to my friend abroad",
         "rate": "what is the exchange rate today"}


def write_data(path, rows: int, offset: int = 0):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for i in range(rows):
            label = LABELS[(i + offset) % 3]
            w.writerow([f"{WORDS[label]} {i}", label])
    return path


@pytest.fixture(scope="module")
def labels_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("labels") / "labels.json"
    path.write_text(json.dumps(LABELS))
    return path


def serve_args(model_dir, labels_file, aggregator, rounds=2, steps=3, head_rounds=0):
    return ["--head-rounds", str(head_rounds), "--model", str(model_dir), "--task", "classification", "--labels", str(labels_file),
            "--aggregator", aggregator, "--ranks", "2,4,8", "--rounds", str(rounds), "--min-clients", "3",
            "--local-steps", str(steps), "--batch-size", "4", "--seq-len", "16", "--poll-seconds", "0.2",
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


@pytest.mark.parametrize("aggregator", ["hetlora", "hlora", "plora", "fedavg"])
def test_three_clients_of_different_ranks_run_two_rounds(tiny_bert_dir, labels_file, tmp_path, aggregator):
    head_rounds = 2 if aggregator == "hetlora" else 0  # one rule runs the head rounds too
    server, url = start_server(serve_args(tiny_bert_dir, labels_file, aggregator, head_rounds=head_rounds),
                               tmp_path / "server")
    status = run_to_end(server, url, lambda: [
        start_client(url, write_data(tmp_path / f"d{i}.csv", 12 + 4 * i, i), tmp_path / f"c{i}",
                     ["--model", str(tiny_bert_dir), "--rank", str(rank), "--poll-seconds", "0.2"])
        for i, rank in enumerate((2, 4, 8))])
    # round 0: head statistics (serve's default), then the head rounds, then two LoRA rounds
    assert [h["stage"] for h in status["history"]] == ["head-statistics"] + ["head-fit"] * head_rounds + ["lora"] * 2
    assert status["history"][0]["statistics"]["head"] in ("lda", "ncm")
    expected_ranks = [8, 8, 8] if aggregator == "fedavg" else [2, 4, 8]
    assert sorted(c["rank"] for c in status["clients"]) == expected_ranks
    for h in status["history"]:
        assert len(h["clients"]) == 3
    logs = [(tmp_path / f"c{i}.log").read_text() for i in range(3)]
    for log in logs:
        assert "training finished" in log and log.count("B up") == 3 + head_rounds, log[-2000:]
    # the bytes the server reports having moved are the bytes the clients logged
    assert sum(h["bytes_down"] for h in status["history"]) == sum(int(x) for x in re.findall(r"(\d+) B down", "".join(logs)))
    assert sum(h["bytes_up"] for h in status["history"]) == sum(int(x) for x in re.findall(r"(\d+) B up", "".join(logs)))


def test_client_killed_mid_round_resumes_with_same_identity(tiny_bert_dir, labels_file, tmp_path):
    server, url = start_server(serve_args(tiny_bert_dir, labels_file, "hetlora", rounds=2, steps=40),
                               tmp_path / "server")
    data = [write_data(tmp_path / f"d{i}.csv", 40, i) for i in range(3)]
    args = ["--model", str(tiny_bert_dir), "--rank", "4", "--poll-seconds", "0.2"]
    victim_log = tmp_path / "c0.log"

    def kill_and_restart_the_first(clients):
        deadline = time.monotonic() + 180
        while "round 1: training" not in (victim_log.read_text() if victim_log.exists() else ""):
            assert time.monotonic() < deadline, victim_log.read_text()
            time.sleep(0.2)
        clients[0].kill()
        clients[0] = start_client(url, data[0], tmp_path / "c0", args)

    status = run_to_end(server, url, lambda: [start_client(url, data[i], tmp_path / f"c{i}", args) for i in range(3)],
                        kill_and_restart_the_first)
    identity = json.loads((tmp_path / "c0" / "state.json").read_text())["client_id"]
    assert len(status["clients"]) == 3  # the restarted client did not register again
    for h in status["history"]:
        assert sorted(h["clients"]) == sorted(c["client_id"] for c in status["clients"])
    log = victim_log.read_text()
    assert f"resuming as client {identity}" in log  # the identity it had before the kill
    assert "duplicate_upload" not in log and "Traceback" not in log


def test_a_client_restarted_between_head_rounds_recomputes_its_features(tiny_bert_dir, labels_file, tmp_path):
    server, url = start_server(serve_args(tiny_bert_dir, labels_file, "hetlora", rounds=1, head_rounds=2),
                               tmp_path / "server")
    data = [write_data(tmp_path / f"d{i}.csv", 20, i) for i in range(3)]
    args = ["--model", str(tiny_bert_dir), "--rank", "4", "--poll-seconds", "0.2"]

    def first_stops_after_round_1():  # its round-0 features live in that process only
        return [start_client(url, data[0], tmp_path / "c0", args + ["--max-rounds", "2"])] + \
            [start_client(url, data[i], tmp_path / f"c{i}", args) for i in (1, 2)]

    def restart_the_first(clients):
        assert clients[0].wait(timeout=180) == 0, clients[0].tail()
        clients[0] = start_client(url, data[0], tmp_path / "c0", args)

    status = run_to_end(server, url, first_stops_after_round_1, restart_the_first)
    assert [h["stage"] for h in status["history"]] == ["head-statistics", "head-fit", "head-fit", "lora"]
    assert all(len(h["clients"]) == 3 for h in status["history"])
    after_restart = (tmp_path / "c0.log").read_text().split("resuming as client")[-1]
    assert "round 2: head fitted on 20 frozen features" in after_restart and "Traceback" not in after_restart
