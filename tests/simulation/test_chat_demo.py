"""The chat task end to end: `hetlora demo --task chat` on the tiny Llama (real processes, per-person data,
zero-shot round 0, perplexity rows), the PEFT folder it writes, and one bounded run of the real
SmolLM2-135M-Instruct through `hetlora serve` / `hetlora client`, then `hetlora generate` with its adapter."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.helpers import chat_rows, write_jsonl

pytestmark = pytest.mark.integration  # real processes end to end (conftest: also slow)

HETLORA = [sys.executable, "-m", "hetlora.cli"]


def run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(HETLORA + args, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def chat_demo(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat-demo")
    data = write_jsonl(tmp / "chats.jsonl", chat_rows(n_users=8, conversations=8, replies=2))
    out = tmp / "run"
    proc = run(["demo", "--task", "chat", "--model", str(tiny_llama_dir), "--data", str(data), "--clients", "3",
                "--clients-per-round", "2", "--rounds", "2", "--local-steps", "3", "--batch-size", "4", "--seq-len", "64",
                "--lr", "5e-3", "--min-replies", "8", "--eval-rows", "20", "--ranks", "2,4", "--out", str(out)])
    return out, proc.stdout


def test_the_chat_demo_reports_perplexity_from_zero_shot_on(chat_demo):
    out, stdout = chat_demo
    rows = json.loads((out / "results.json").read_text())
    assert [(r["round"], r["stage"]) for r in rows] == [(0, "start"), (1, "lora"), (2, "lora")]
    assert all(r["perplexity"] > 1 and r["personal_perplexity"] > 1 and "accuracy" not in r for r in rows)
    assert rows[0]["mean_rank"] == 0 and all(2 <= r["mean_rank"] <= 4 for r in rows[1:])
    assert rows[-1]["perplexity"] < rows[0]["perplexity"]  # the tiny model learns the synthetic replies
    assert "perplexity" in stdout and "(zero-shot) ->" in stdout
    assert (out / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the estimated fleet energy: none before training, then it grows; the tiers' joules add up to it
    spent = [r["energy_j"] for r in rows]
    assert spent[0] == 0 and 0 < spent[1] < spent[2], spent
    tiers = json.loads((out / "energy.json").read_text())["methods"]["hetlora"]["tiers"]
    assert sum(t["joules"] for t in tiers.values()) == pytest.approx(spent[-1])
    assert sum(t["device_rounds"] for t in tiers.values()) == 2 * 2 and "training energy per device tier" in stdout
    assert (out / "energy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # One person per device: each client file holds the replies of a single user.
    for part in sorted((out / "data").glob("client_*.jsonl")):
        assert len({json.loads(line)["user"] for line in part.read_text().splitlines()}) == 1


def test_the_chat_demos_peft_folder_loads_with_auto_peft_and_matches_the_wire_adapter(chat_demo, tiny_llama_dir):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    from edge_client.evaluate import Evaluator
    from hetlora.protocol.wire import decode

    out, _ = chat_demo
    peft_model = AutoPeftModelForCausalLM.from_pretrained(out / "hetlora" / "peft").eval()
    reference = Evaluator(tiny_llama_dir, "causal-lm")  # W0 + B @ A merged: an independent path
    reference.merge(decode((out / "hetlora" / "global.safetensors").read_bytes()))
    ids = AutoTokenizer.from_pretrained(tiny_llama_dir)("hey there, how are you", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, reference.model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def real_model_run(smollm2_dir, tmp_path_factory):
    """SmolLM2-135M-Instruct, one client, one round of 3 steps of batch 2: the real model through the product."""
    from simulation.fleet import start_client
    from tests.helpers.fleet import run_to_end, start_server

    tmp = tmp_path_factory.mktemp("smollm2")
    rows = [{"prompt": "hey, how was your weekend?", "response": "pretty chill, went hiking with my dog"},
            {"prompt": "what are you up to?", "response": "just got home from work, making dinner"}] * 4
    data = write_jsonl(tmp / "mine.jsonl", rows)
    server, url = start_server(["--task", "causal-lm", "--aggregator", "fedavg", "--ranks", "4", "--rounds", "1",
                                "--min-clients", "1", "--local-steps", "3", "--batch-size", "2", "--seq-len", "64",
                                "--lr", "2e-3", "--poll-seconds", "0.2"], tmp / "server")
    status = run_to_end(server, url, lambda: [start_client(url, data, tmp / "client", ["--poll-seconds", "0.2"],
                                                           threads=2)])
    return tmp, status


def test_the_real_model_trains_a_round_and_answers_with_its_adapter(real_model_run, smollm2_dir):
    tmp, status = real_model_run
    client_log = (tmp / "client.log").read_text()
    before, after = map(float, re.search(r"loss ([0-9.]+) -> ([0-9.]+)", client_log).groups())
    assert after < before  # three steps on two replies lower their loss
    assert status["finished"] and status["history"][-1]["effective_ranks"]
    global_file = sorted((tmp / "server" / "blobs" / "globals").glob("v*.safetensors"))[-1]
    reply = json.loads(run(["generate", "--adapter", str(global_file), "--prompt", "what are you up to?",
                            "--max-new-tokens", "12", "--json"]).stdout)
    assert reply["tokens"] >= 1 and reply["reply"]
    base = json.loads(run(["generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "12",
                           "--json"]).stdout)
    assert "Paris" in base["reply"]  # the converted model is the real instruct model


def test_generate_refuses_an_adapter_of_another_base_model(chat_demo, tiny_llama_dir, tmp_path):
    from transformers import LlamaForCausalLM

    out, _ = chat_demo
    adapter = str(out / "hetlora" / "global.safetensors")
    proc = subprocess.run(HETLORA + ["generate", "--adapter", adapter, "--prompt", "hi"],
                          capture_output=True, text=True, timeout=300)  # the tiny model's adapter on SmolLM2
    assert proc.returncode == 2 and "does not fit the base model" in proc.stderr and "Traceback" not in proc.stderr
    # Same shapes, other weights: only the recorded spec fingerprint tells them apart.
    other = tmp_path / "other-llama"
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.normal_()
    model.save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (other / name).write_bytes((tiny_llama_dir / name).read_bytes())
    proc = subprocess.run(HETLORA + ["generate", "--model", str(other), "--adapter", adapter, "--prompt", "hi"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "trained on another base model" in proc.stderr, proc.stderr
    ok = run(["generate", "--model", str(tiny_llama_dir), "--adapter", adapter, "--prompt", "hi",
              "--max-new-tokens", "3", "--json"])
    assert json.loads(ok.stdout)["tokens"] >= 1


def test_the_memory_model_tracks_the_real_models_step(smollm2_dir):
    """Peak RSS of two real SmolLM2 steps within 20% of the memory model, in a fresh process."""
    from profiles.memory_model import ModelShape, predict_peak_memory

    script = ("import json, resource, sys, torch; sys.argv = ['x']; import benchmarks.bench_memory as b; "
              "print(json.dumps(b.worker('causal-lm', 8, 4, 64)))")
    # a hang guard, not a time limit: two steps of the 135M model took over 300 s on a 2-core machine at load 10
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=1200, check=True)
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss"]
    predicted = predict_peak_memory(ModelShape.from_model_dir(smollm2_dir), 8, 4, 64, task="causal-lm",
                                    target_fraction=1 / 3).total
    assert abs(predicted - measured) / measured < 0.2, (predicted, measured)
    assert np.isfinite(measured)


@pytest.fixture(scope="module")
def chat_server(tiny_llama_dir, tmp_path_factory):
    """One causal-lm `hetlora serve` for the bad-data clients: none of them may register, so they can share it (and
    each finds it still without clients)."""
    from tests.helpers.fleet import start_server

    state = tmp_path_factory.mktemp("chat-server") / "server"
    server, url = start_server(["--model", str(tiny_llama_dir), "--task", "causal-lm", "--ranks", "2",
                                "--rounds", "1", "--min-clients", "1"], state)
    yield url
    server.stop()


@pytest.mark.parametrize("name, content, message", [
    ("cols.jsonl", '{"question": "a", "answer": "b"}\n'.encode(), "neither prompt and response columns"),
    ("empty.jsonl", '{"prompt": "a", "response": ""}\n'.encode(), "row 1 has an empty 'response'"),
    ("latin1.csv", "prompt,response\ncafé,très\n".encode("latin-1"), "is not UTF-8 text"),
])
def test_a_client_with_bad_chat_data_stops_with_one_line_and_never_registers(chat_server, tiny_llama_dir, tmp_path,
                                                                               name, content, message):
    from edge_client.server_api import ServerAPI

    bad = tmp_path / name
    bad.write_bytes(content)
    proc = subprocess.run(HETLORA + ["client", "--server", chat_server, "--data", str(bad), "--model",
                                     str(tiny_llama_dir), "--state-dir", str(tmp_path / "client")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert ServerAPI(chat_server).status()["clients"] == []
