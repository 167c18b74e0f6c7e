"""A mixed fleet from the command line: `hetlora serve` and three `hetlora client` processes on loopback,
one per backend (torch, ExecuTorch, ONNX Runtime), against the same run with three torch clients.

Every backend runs the plan's optimiser (AdamW, warm-up + cosine, the head at its own lr) and its
batching, so the mixed fleet ends where the all-torch fleet ends (accuracy within 1 point, near-equal
globals) and the server's bounded-influence step clips no client. The ExecuTorch client is configured
by a TOML file, as a device service would be.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from edge_client.evaluate import Evaluator
from edge_client.data import load_examples
from hetlora.protocol.wire import decode
from simulation.fleet import start_client
from tests.conftest import ARTIFACT_LABELS
from tests.helpers.fleet import run_to_end, serve_args, start_server, write_data

pytestmark = pytest.mark.integration  # real processes end to end (conftest: also slow)

pytest.importorskip("onnxruntime.training", reason="these fleets train ONNX clients too")

ROUNDS = 3
TRAINING = ["--lr", "2e-2", "--head-lr", "5e-2", "--schedule", "cosine", "--warmup-steps", "2", "--head-init", "none"]


def run_fleet(tmp_path, model_dir, labels_file, artifacts, backends: tuple[str, ...]) -> tuple[dict, list]:
    """One run of three named clients (client i on backends[i], data i); (final status, globals by version)."""
    args = serve_args(model_dir, labels_file, "hetlora", rounds=ROUNDS, steps=8) + TRAINING
    args[args.index("--ranks") + 1] = "4"
    server, url = start_server(args, tmp_path / "server")

    def client(i: int, backend: str):
        flags = ["--model", str(model_dir), "--name", f"device-{i}", "--poll-seconds", "0.2"]
        if backend == "executorch":  # configured by a file, as a device service would be
            config = tmp_path / f"c{i}.toml"
            config.write_text(f'backend = "executorch"\nartifacts = "{artifacts}"\n')
            flags += ["--config", str(config)]
        elif backend == "onnx":
            flags += ["--backend", "onnx", "--artifacts", str(artifacts)]
        return start_client(url, write_data(tmp_path / f"d{i}.csv", 24, i), tmp_path / f"c{i}", flags)

    status = run_to_end(server, url, lambda: [client(i, b) for i, b in enumerate(backends)])
    for i, backend in enumerate(backends):
        log = (tmp_path / f"c{i}.log").read_text()
        assert "Traceback" not in log and "cpuinfo_utils" not in log, log[-2000:]
        assert "(8 steps, batch 4, seq 16, adamw lr 0.02)" in log, log[-2000:]
    versions = sorted((tmp_path / "server" / "blobs" / "globals").glob("v*.safetensors"))
    return status, [decode(v.read_bytes()) for v in versions]


def accuracy(model_dir, adapter, test_csv) -> float:
    labels = list(ARTIFACT_LABELS)
    examples = load_examples(test_csv, "classification", labels)
    return Evaluator(model_dir, "classification", labels).evaluate(adapter, examples, seq_len=16)["accuracy"]


def test_a_mixed_fleet_ends_where_an_all_torch_fleet_ends(tiny_bert_dir, tiny_artifacts, labels_file, tmp_path):
    runs = {name: run_fleet(tmp_path / name, tiny_bert_dir, labels_file, tiny_artifacts, backends)
            for name, backends in [("torch", ("torch",) * 3), ("mixed", ("torch", "executorch", "onnx"))]}
    test_csv = write_data(tmp_path / "test.csv", 60, 1)
    for status, _ in runs.values():
        lora = [h for h in status["history"] if h["stage"] == "lora"]
        assert len(lora) == ROUNDS and all(len(h["clients"]) == 3 for h in lora)
        assert all(not h["statistics"]["clipped"] for h in lora), [h["statistics"]["clipped"] for h in lora]
    start, final = runs["torch"][1][0], runs["torch"][1][-1]
    before, after = (accuracy(tiny_bert_dir, g, test_csv) for g in (start, final))
    mixed = accuracy(tiny_bert_dir, runs["mixed"][1][-1], test_csv)
    assert after >= before + 0.2, f"the run must learn for the comparison to mean anything ({before} -> {after})"
    assert abs(mixed - after) <= 0.01, f"mixed fleet {mixed:.3f} vs all-torch {after:.3f}"
    for name, (a, b) in final.lora.items():
        ma, mb = runs["mixed"][1][-1].lora[name]
        assert np.linalg.norm(mb @ ma - b @ a) <= 1e-2 * np.linalg.norm(b @ a), name
    for i in range(3):  # each mixed-fleet client logged the round losses of its torch twin (printed to 4 places)
        twin, got = (losses((tmp_path / name / f"c{i}.log").read_text()) for name in ("torch", "mixed"))
        assert len(got) == ROUNDS and np.allclose(got, twin, rtol=0, atol=2e-4), (i, got, twin)


def losses(log: str) -> list[tuple[float, float]]:
    """(loss before, loss after) of every LoRA round in a client's log."""
    return [tuple(map(float, m)) for m in re.findall(r"loss ([\d.]+) -> ([\d.]+)", log)]
