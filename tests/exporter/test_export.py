"""`hetlora export`: manifest contents, the CLI, and clear errors for what cannot be exported.

The artifacts are the session's (conftest.tiny_artifacts: `hetlora export` of ranks 2 and 4, both backends).
"""

from __future__ import annotations

import json

import pytest

from edge_client.backends.artifacts import load_manifest, sha256_file
from hetlora.models.adapter_spec import derive_spec
from hetlora.models.folders import default_targets, model_hash
from hetlora.cli import main
from hetlora.errors import UserError
from tests.conftest import ARTIFACT_BACKENDS, ARTIFACT_LABELS, needs_onnx_training



def test_manifest_describes_every_artifact(tiny_artifacts, tiny_bert_dir):
    doc = json.loads((tiny_artifacts / "manifest.json").read_text())
    spec = derive_spec(tiny_bert_dir, "classification", default_targets(tiny_bert_dir), 3)
    assert doc["model_hash"] == model_hash(tiny_bert_dir) and doc["spec_fingerprint"] == spec.fingerprint
    assert doc["labels"] == list(ARTIFACT_LABELS) and doc["num_labels"] == 3
    assert (doc["batch"], doc["seq_len"], doc["task"]) == (4, 16, "classification")
    wire = {m + suffix for m in spec.modules for suffix in (".lora_A", ".lora_B")} | set(spec.dense)
    assert set(doc["parameters"].values()) == wire
    assert [(a["rank"], a["backend"]) for a in doc["artifacts"]] == [(r, b) for r in (2, 4) for b in ARTIFACT_BACKENDS]
    roles = {"onnx": {"training_model", "eval_model", "checkpoint", "initial", "weights"},
             "executorch": {"program", "weights"}}
    for entry in doc["artifacts"]:
        assert "optimizer" not in entry, "an artifact computes gradients only; the device runs the optimiser"
        assert set(entry["files"]) == roles[entry["backend"]]
        for f in entry["files"].values():
            path = tiny_artifacts / f["path"]
            assert path.stat().st_size == f["bytes"] and sha256_file(path) == f["sha256"]


@needs_onnx_training
def test_frozen_weights_stay_frozen_in_the_onnx_artifact(tiny_artifacts):
    """Only the LoRA factors and the head are trainable parameters of the session."""
    from edge_client.backends.onnx_backend import OnnxEngine

    manifest = load_manifest(tiny_artifacts)
    engine = OnnxEngine(manifest.artifact("onnx", 3))
    trainable = {name for name, p in engine.state.parameters if p.requires_grad}
    assert trainable == set(manifest.parameters)
    assert "model.bert.embeddings.word_embeddings.weight" not in manifest.parameters


@needs_onnx_training
def test_smallest_fitting_rank_is_chosen(tiny_artifacts):
    manifest = load_manifest(tiny_artifacts)
    assert manifest.artifact("onnx", 1).rank == 2 and manifest.artifact("executorch", 3).rank == 4
    with pytest.raises(UserError, match="no onnx artifact for rank 5"):
        manifest.artifact("onnx", 5)
    with pytest.raises(UserError, match="no tflite artifact"):
        manifest.artifact("tflite", 2)


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


def test_executorch_reads_each_frozen_weight_in_place(tiny_artifacts, tiny_bert_dir):
    """frozen_weights.ptd holds every frozen parameter once, under its own name and shape, for the program to read at
    run time: no entry keyed by content for XNNPACK to pack at load (a packed copy per layout, forward W and
    backward W^T, would sit beside the file's pages)."""
    from executorch.exir._serialize._cord import Cord
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    from exporter.training_graph import build_training_graph

    manifest = load_manifest(tiny_artifacts)
    ptd = manifest.artifact("executorch", 2).files["weights"]
    data = FlatTensorSerializer().deserialize(Cord(ptd.read_bytes()))
    graph = build_training_graph(tiny_bert_dir, "classification", 2, default_targets(tiny_bert_dir), 16.0, num_labels=3)
    frozen = {name: p for name, p in graph.named_parameters() if not p.requires_grad}
    assert {name: tuple(e.tensor_layout.sizes) for name, e in data.named_data.items()} == {
        name: tuple(p.shape) for name, p in frozen.items()}
    # Stored at most once (equal tensors, e.g. the tiny model's LayerNorm ones, share one buffer).
    assert sum(len(b) for b in data.buffers) <= sum(p.numel() * p.element_size() for p in frozen.values())
