"""`hetlora export`: manifest contents, the CLI, and clear errors for what cannot be exported.

ONNX only here (seconds per artifact); the ExecuTorch export is exercised in test_backends.py.
"""

from __future__ import annotations

import json

import pytest

from edge_client.backends.artifacts import load_manifest, sha256_file
from edge_client.models import derive_spec, model_hash
from hetlora.cli import main
from hetlora.errors import UserError

pytest.importorskip("onnxruntime.training")

TARGETS = ("query", "value")


@pytest.fixture(scope="module")
def exported(tiny_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export-cli")
    labels = tmp_path_factory.mktemp("labels") / "labels.txt"
    labels.write_text("card\npayment\nexchange\n")
    code = main(["export", "--model", str(tiny_bert_dir), "--task", "classification", "--labels", str(labels),
                 "--ranks", "4,2", "--batch", "2", "--seq-len", "8", "--backends", "onnx",
                 "--targets", ",".join(TARGETS), "--out", str(out), "--no-progress"])
    assert code == 0
    return out


def test_manifest_describes_every_artifact(exported, tiny_bert_dir):
    doc = json.loads((exported / "manifest.json").read_text())
    spec = derive_spec(tiny_bert_dir, "classification", TARGETS, 3)
    assert doc["model_hash"] == model_hash(tiny_bert_dir) and doc["spec_fingerprint"] == spec.fingerprint
    assert doc["labels"] == ["card", "payment", "exchange"] and doc["num_labels"] == 3
    assert (doc["batch"], doc["seq_len"], doc["task"]) == (2, 8, "classification")
    wire = {m + suffix for m in spec.modules for suffix in (".lora_A", ".lora_B")} | set(spec.dense)
    assert set(doc["parameters"].values()) == wire
    assert [a["rank"] for a in doc["artifacts"]] == [2, 4]
    for entry in doc["artifacts"]:
        assert entry["optimizer"]["name"] == "adamw"
        assert set(entry["files"]) == {"training_model", "eval_model", "optimizer_model", "checkpoint"}
        for f in entry["files"].values():
            path = exported / f["path"]
            assert path.stat().st_size == f["bytes"] and sha256_file(path) == f["sha256"]


def test_frozen_weights_stay_frozen_in_the_onnx_artifact(exported):
    """Only the LoRA factors and the head are trainable parameters in the checkpoint."""
    from onnxruntime.training.api import CheckpointState

    manifest = load_manifest(exported)
    state = CheckpointState.load_checkpoint(str(manifest.artifact("onnx", 3).files["checkpoint"]))
    trainable = {name for name in manifest.parameters if state.parameters[name].requires_grad}
    assert trainable == set(manifest.parameters)
    assert "model.bert.embeddings.word_embeddings.weight" not in manifest.parameters


def test_smallest_fitting_rank_is_chosen(exported):
    manifest = load_manifest(exported)
    assert manifest.artifact("onnx", 1).rank == 2 and manifest.artifact("onnx", 3).rank == 4
    with pytest.raises(UserError, match="no onnx artifact for rank 5"):
        manifest.artifact("onnx", 5)
    with pytest.raises(UserError, match="no executorch artifact"):
        manifest.artifact("executorch", 2)


def test_bad_requests_are_user_errors(tiny_bert_dir, tmp_path, capsys):
    base = ["export", "--model", str(tiny_bert_dir), "--out", str(tmp_path / "x"), "--no-progress"]
    assert main(base + ["--task", "classification", "--backends", "onnx"]) == 2
    assert "--num-labels" in capsys.readouterr().err
    assert main(base + ["--task", "causal-lm", "--backends", "tflite"]) == 2
    assert "unknown backend" in capsys.readouterr().err
    with pytest.raises(UserError, match="manifest.json"):
        load_manifest(tmp_path)


def test_unsupported_model_names_the_operation(tmp_path):
    """FNet mixes tokens with an FFT, which the ONNX exporter cannot express: the error says so."""
    import torch
    from transformers import FNetConfig, FNetModel

    from exporter.export import ExportRequest, export_all

    torch.manual_seed(0)
    model_dir = tmp_path / "tiny-fnet"
    FNetModel(FNetConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, intermediate_size=32,
                         max_position_embeddings=32)).save_pretrained(model_dir)
    req = ExportRequest(model_dir=model_dir, task="classification", ranks=(2,), batch=2, seq_len=8,
                        backends=("onnx",), out=tmp_path / "out", targets=("intermediate.dense",), num_labels=2)
    with pytest.raises(UserError, match="unsupported operation .*fft") as info:
        export_all(req, progress=False)
    assert "--backend torch" in str(info.value)
