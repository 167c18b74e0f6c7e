"""A chat round from exported causal-LM artifacts, from the command line: `hetlora serve --task causal-lm` and
three `hetlora client` processes on loopback (torch, ExecuTorch, ONNX Runtime) on the tiny Llama.

Every client holds the same four chat rows and the batch is four, so every step of every client sees the
same batch (in some order): the artifact clients must log the torch client's losses and upload its update.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from hetlora.protocol.wire import decode
from simulation.fleet import start_client
from tests.conftest import ARTIFACT_BATCH, LLAMA_ARTIFACT_RANK, LLAMA_ARTIFACT_SEQ, LLAMA_TARGETS
from tests.helpers import chat_rows, write_jsonl
from tests.helpers.fleet import run_to_end, start_server

pytestmark = pytest.mark.integration  # real processes end to end (conftest: also slow)

pytest.importorskip("onnxruntime.training", reason="these fleets train ONNX clients too")

BACKENDS = ("torch", "executorch", "onnx")
STEPS = 4


@pytest.fixture(scope="module")
def chat_run(tiny_llama_dir, tiny_llama_artifacts, tmp_path_factory):
    """One LoRA round of the three clients; (run folder, final status)."""
    tmp = tmp_path_factory.mktemp("chat-artifacts")
    data = write_jsonl(tmp / "chats.jsonl", chat_rows(n_users=2, conversations=1, replies=1))
    assert len(data.read_text().splitlines()) == ARTIFACT_BATCH
    server, url = start_server(
        ["--model", str(tiny_llama_dir), "--task", "causal-lm", "--targets", ",".join(LLAMA_TARGETS),
         "--aggregator", "hetlora", "--ranks", str(LLAMA_ARTIFACT_RANK), "--rounds", "1", "--min-clients", "3",
         "--local-steps", str(STEPS), "--batch-size", str(ARTIFACT_BATCH), "--seq-len", str(LLAMA_ARTIFACT_SEQ),
         "--lr", "1e-2", "--poll-seconds", "0.2", "--round-deadline", "300"], tmp / "server")

    def client(backend: str):
        flags = ["--model", str(tiny_llama_dir), "--name", backend, "--poll-seconds", "0.2", "--backend", backend]
        if backend != "torch":
            flags += ["--artifacts", str(tiny_llama_artifacts)]
        return start_client(url, data, tmp / backend, flags)

    return tmp, run_to_end(server, url, lambda: [client(b) for b in BACKENDS])


def test_artifact_clients_finish_a_chat_round_with_torchs_losses(chat_run):
    tmp, status = chat_run
    assert status["finished"]
    (lora,) = [h for h in status["history"] if h["stage"] == "lora"]
    assert len(lora["clients"]) == 3
    losses = {}
    for backend in BACKENDS:
        log = (tmp / f"{backend}.log").read_text()
        assert "Traceback" not in log and "cpuinfo_utils" not in log, log[-2000:]
        assert f"({STEPS} steps, batch {ARTIFACT_BATCH}, seq {LLAMA_ARTIFACT_SEQ}, adamw lr 0.01)" in log, log[-2000:]
        losses[backend] = [float(x) for x in re.search(r"loss ([\d.]+) -> ([\d.]+)", log).groups()]
    before, after = losses["torch"]
    assert after < before - 0.01, "the round must learn for the comparison to mean anything"
    for backend in ("executorch", "onnx"):  # the log prints 4 places
        np.testing.assert_allclose(losses[backend], losses["torch"], rtol=0, atol=2e-4, err_msg=backend)


def test_artifact_clients_upload_torchs_update(chat_run):
    tmp, _ = chat_run
    start = decode((tmp / "server" / "blobs" / "globals" / "v0000.safetensors").read_bytes())
    uploads = [decode(p.read_bytes()) for p in sorted((tmp / "server" / "blobs" / "uploads").rglob("*.safetensors"))]
    assert len(uploads) == 3
    deltas = [{name: b @ a - start.lora[name][1] @ start.lora[name][0] for name, (a, b) in u.lora.items()}
              for u in uploads]
    for name, reference in deltas[0].items():
        assert np.linalg.norm(reference) > 1e-2, "the update must be large against the tolerance"
        for other in deltas[1:]:
            np.testing.assert_allclose(other[name], reference, rtol=0, atol=1e-4, err_msg=name)
