"""End to end: a real `hetlora serve` and real `hetlora client` processes on loopback."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest

from edge_client.server_api import ServerAPI
from hetlora.models.adapter_spec import derive_spec
from hetlora.protocol.wire import decode, encode
from simulation.fleet import start_client
from tests.helpers.adapters import random_adapter
from tests.helpers.fleet import run_to_end, serve_args, start_server, write_data

pytestmark = pytest.mark.integration  # real processes end to end (conftest: also slow)


def self_pruning(model_dir, tmp_path) -> list[str]:
    """serve options under which hetlora's clients self-prune in the first LoRA round: a start whose tail is large
    (an --init-adapter with B ~ N(0, 0.5), factors only) under a tail penalty that outweighs the task, gamma 0.5 (rank 8 -> 4,
    4 -> 2), never below rank 2. (From a zero B the tail only grows: the rule's zero padding shrinks it again
    every round.)"""
    init = tmp_path / "init.safetensors"
    init.write_bytes(encode(random_adapter(derive_spec(model_dir, "classification", num_labels=3), 8, seed=4,
                                           b_scale=0.5, dense=False)))  # no head: round 0 sets it
    return ["--init-adapter", str(init), "--prune-lambda", "100", "--prune-gamma", "0.5", "--min-rank", "2", "--lr",
            "0.01", "--warmup-steps", "0"]


@pytest.mark.parametrize("aggregator", ["hetlora", "hlora", "plora", "fedavg"])
def test_three_clients_of_different_ranks_run_two_rounds(tiny_bert_dir, labels_file, tmp_path, aggregator):
    head_rounds = 2 if aggregator == "hetlora" else 0  # one rule runs the head rounds too
    pruning = self_pruning(tiny_bert_dir, tmp_path) if aggregator == "hetlora" else []
    server, url = start_server(serve_args(tiny_bert_dir, labels_file, aggregator, head_rounds=head_rounds) + pruning,
                               tmp_path / "server")
    status = run_to_end(server, url, lambda: [
        start_client(url, write_data(tmp_path / f"d{i}.csv", 12 + 4 * i, i), tmp_path / f"c{i}",
                     ["--model", str(tiny_bert_dir), "--rank", str(rank), "--poll-seconds", "0.2"])
        for i, rank in enumerate((2, 4, 8))])
    # round 0: head statistics (serve's default), then the head rounds, then two LoRA rounds
    assert [h["stage"] for h in status["history"]] == ["head-statistics"] + ["head-fit"] * head_rounds + ["lora"] * 2
    assert status["history"][0]["statistics"]["head"] in ("lda", "ncm")
    assert sorted(c["requested_rank"] for c in status["clients"]) == [2, 4, 8]
    for h in status["history"]:
        assert len(h["clients"]) == 3
    lora = [h for h in status["history"] if h["stage"] == "lora"]
    uploaded = {c["client_id"]: [h["effective_ranks"][c["client_id"]] for h in lora] for c in status["clients"]}
    if aggregator == "hetlora":  # the rank-8 client pruned in a round; the server plans its pruned rank since
        eight = next(c for c in status["clients"] if c["requested_rank"] == 8)
        pruned = min(uploaded[eight["client_id"]])
        assert pruned < 8 and eight["rank"] == pruned, (uploaded, status["clients"])
    else:
        expected = {c["client_id"]: 8 if aggregator == "fedavg" else c["requested_rank"] for c in status["clients"]}
        assert uploaded == {cid: [rank] * len(lora) for cid, rank in expected.items()}
        assert {c["client_id"]: c["rank"] for c in status["clients"]} == expected
    globals_ = [decode(p.read_bytes()) for p in sorted((tmp_path / "server" / "blobs" / "globals").glob("v*.safetensors"))]
    before_lora, final = globals_[-1 - len(lora)], globals_[-1]
    for name, (a, b) in final.lora.items():  # training moved every module of the global
        assert not np.array_equal(b, before_lora.lora[name][1]) and np.abs(b).max() > 0, name
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
        victim = json.loads((tmp_path / "c0" / "state.json").read_text())["client_id"]
        current = ServerAPI(url).status()["round"]  # the kill landed while round 1 waited for its upload
        assert current["number"] == 1 and victim in current["selected"] and victim not in current["uploads"], current
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
