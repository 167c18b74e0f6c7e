"""PEFT both ways: `hetlora peft export` loads with PEFT's Auto classes from the folder alone, and a PEFT
adapter of any r / lora_alpha starts a federation (`hetlora serve --init-adapter`) whose global
computes PEFT's own logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from simulation.fleet import start_server
from hetlora.models.adapter_spec import derive_spec
from edge_client.server_api import ServerAPI
from hetlora.protocol.wire import decode, encode
from hetlora.cli import build_parser, main
from hetlora.errors import UserError
from tests.conftest import ARTIFACT_LABELS
from tests.helpers.adapters import our_logits, random_adapter

LABELS = list(ARTIFACT_LABELS)


@pytest.mark.slow
def test_export_loads_with_auto_peft_for_classification(tiny_bert_dir, labels_file, tmp_path, monkeypatch):
    from peft import AutoPeftModelForSequenceClassification

    adapter = random_adapter(derive_spec(tiny_bert_dir, "classification", num_labels=3), rank=4, seed=7, scale=0.3)
    expected, enc = our_logits(tiny_bert_dir, "classification", adapter, 3)
    (tmp_path / "g.safetensors").write_bytes(encode(adapter))
    monkeypatch.chdir(tmp_path)
    assert main(["peft", "export", "--adapter", "g.safetensors", "--model", str(tiny_bert_dir),
                 "--labels", str(labels_file), "--out", "peft"]) == 0
    config = json.loads(Path("peft/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "peft" / "base").resolve())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the recorded base path holds from any working directory
    model = AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "peft")).eval()
    assert model.config.num_labels == 3 and model.config.id2label == dict(enumerate(LABELS))
    assert model.config.label2id == {name: i for i, name in enumerate(LABELS)}
    with torch.no_grad():
        got = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_export_loads_with_auto_peft_for_causal_lm(tiny_llama_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM

    adapter = random_adapter(derive_spec(tiny_llama_dir, "causal-lm"), rank=3, seed=8, scale=0.3)
    expected, enc = our_logits(tiny_llama_dir, "causal-lm", adapter)
    (tmp_path / "g.safetensors").write_bytes(encode(adapter))
    assert main(["peft", "export", "--adapter", str(tmp_path / "g.safetensors"), "--model", str(tiny_llama_dir),
                 "--task", "causal-lm", "--out", str(tmp_path / "peft"), "--base-path", str(tiny_llama_dir)]) == 0
    model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "peft")).eval()
    with torch.no_grad():
        got = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_export_refuses_an_adapter_of_another_base_model(tiny_bert_dir, labels_file, tmp_path, capsys):
    spec = derive_spec(tiny_bert_dir, "classification", num_labels=3)
    adapter = random_adapter(spec, rank=2, seed=1, scale=0.3)
    adapter.meta = {"spec_fingerprint": spec.fingerprint}
    (tmp_path / "g.safetensors").write_bytes(encode(adapter))
    assert main(["peft", "export", "--adapter", str(tmp_path / "g.safetensors"), "--labels", str(labels_file),
                 "--out", str(tmp_path / "peft")]) == 2  # no --model: the bundled MiniLM, not the tiny BERT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit the base model" in err[0] and "pass --model" in err[0]
    assert not (tmp_path / "peft").exists()


def peft_adapter(model_dir, out: Path, *, r: int, alpha: float, rslora: bool = False, targets=None, seed: int = 0):
    """A PEFT LoRA adapter saved by PEFT itself, every factor and the head random; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(LABELS))
    targets = list(targets or derive_spec(model_dir, "classification", num_labels=3).targets)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=targets,
                                            task_type="SEQ_CLS"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(out)
    return model.eval()


def serve_args(model_dir, labels_file, init) -> list[str]:
    return ["--model", str(model_dir), "--labels", str(labels_file), "--ranks", "2,4,8", "--rounds", "1",
            "--init-adapter", str(init)]


@pytest.mark.integration
@pytest.mark.parametrize("r,alpha,rslora", [(6, 10, False), (5, 7, True)])
def test_served_init_adapter_computes_peft_logits(tiny_bert_dir, labels_file, tmp_path, r, alpha, rslora):
    """alpha / r = 5/3 and 7/sqrt(5): no power of two, yet the global computes what PEFT computes."""
    peft_model = peft_adapter(tiny_bert_dir, tmp_path / "peft", r=r, alpha=alpha, rslora=rslora)
    server, url = start_server(serve_args(tiny_bert_dir, labels_file, tmp_path / "peft"), tmp_path / "server")
    try:
        global_ = decode(ServerAPI(url).global_adapter(version=0))
        status = ServerAPI(url).status()
    finally:
        server.stop()
    assert global_.rank == 8 and status["run"]["head_init"] == "none"  # the adapter brings its head
    expected, enc = our_logits(tiny_bert_dir, "classification", global_, 3)
    with torch.no_grad():
        got = peft_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    torch.testing.assert_close(expected, got, rtol=0, atol=1e-5)
    assert all(a[r:].any() and not b[:, r:].any() for a, b in global_.lora.values())  # spare components can learn


def test_peft_import_command_folds_the_scale(tiny_bert_dir, tmp_path):
    peft_adapter(tiny_bert_dir, tmp_path / "peft", r=3, alpha=5)
    assert main(["peft", "import", "--peft", str(tmp_path / "peft"), "--out", str(tmp_path / "w.safetensors")]) == 0
    wire = decode((tmp_path / "w.safetensors").read_bytes())
    from safetensors.numpy import load_file

    raw = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    name = sorted(wire.lora)[0]
    np.testing.assert_array_equal(wire.lora[name][0], raw[f"base_model.model.{name}.lora_A.weight"])
    np.testing.assert_allclose(wire.lora[name][1], raw[f"base_model.model.{name}.lora_B.weight"] * (5 / 3), rtol=1e-6)
    assert wire.dense["classifier.weight"].shape == (3, 32)


def build(argv):
    from server_stub.cli import build_config

    return build_config(build_parser().parse_args(["serve", *argv]))


def test_init_adapter_is_checked_against_the_run(tiny_bert_dir, labels_file, tmp_path):
    peft_adapter(tiny_bert_dir, tmp_path / "query-only", r=4, alpha=8, targets=["query"])
    with pytest.raises(UserError, match="--init-adapter does not fit this run: module .* is missing"):
        build(serve_args(tiny_bert_dir, labels_file, tmp_path / "query-only"))
    peft_adapter(tiny_bert_dir, tmp_path / "r16", r=16, alpha=16)
    with pytest.raises(UserError, match="rank 16, above the run's global rank 8"):
        build(serve_args(tiny_bert_dir, labels_file, tmp_path / "r16"))
    four = tmp_path / "four.json"
    four.write_text(json.dumps(LABELS + ["other"]))
    with pytest.raises(UserError, match=r"does not fit this run: classifier\.(weight|bias): shape"):
        build(serve_args(tiny_bert_dir, four, tmp_path / "r16") + ["--global-rank", "16"])
    config = json.loads((tmp_path / "r16" / "adapter_config.json").read_text())
    (tmp_path / "r16" / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(UserError, match="uses use_dora"):
        build(serve_args(tiny_bert_dir, labels_file, tmp_path / "r16"))
    with pytest.raises(UserError, match="adapter_config.json is missing"):
        build(serve_args(tiny_bert_dir, labels_file, tmp_path))
    headless = random_adapter(derive_spec(tiny_bert_dir, "classification", num_labels=3), rank=2, seed=1, scale=0.3)
    headless.dense = {}
    (tmp_path / "headless.safetensors").write_bytes(encode(headless))
    with pytest.raises(UserError, match="has no classification head"):
        build(serve_args(tiny_bert_dir, labels_file, tmp_path / "headless.safetensors") + ["--head-init", "none"])
    assert build(serve_args(tiny_bert_dir, labels_file, tmp_path / "headless.safetensors")).head_init == "lda"


def test_a_state_dir_is_bound_to_its_init_adapter(tiny_bert_dir, labels_file, tmp_path):
    from server_stub.app import build_coordinator

    peft_adapter(tiny_bert_dir, tmp_path / "a", r=4, alpha=8, seed=1)
    peft_adapter(tiny_bert_dir, tmp_path / "b", r=4, alpha=8, seed=2)
    build_coordinator(build(serve_args(tiny_bert_dir, labels_file, tmp_path / "a")), tmp_path / "state").store.close()
    build_coordinator(build(serve_args(tiny_bert_dir, labels_file, tmp_path / "a")), tmp_path / "state").store.close()
    with pytest.raises(UserError, match="belongs to another run .*init_adapter"):
        build_coordinator(build(serve_args(tiny_bert_dir, labels_file, tmp_path / "b")), tmp_path / "state")


def test_export_of_a_mean_pooling_model_warns_about_auto_classes(tiny_mean_bert_dir, labels_file, tmp_path, caplog):
    adapter = random_adapter(derive_spec(tiny_mean_bert_dir, "classification", num_labels=3), rank=2, seed=9, scale=0.3)
    (tmp_path / "g.safetensors").write_bytes(encode(adapter))
    assert main(["peft", "export", "--adapter", str(tmp_path / "g.safetensors"), "--model", str(tiny_mean_bert_dir),
                 "--labels", str(labels_file), "--out", str(tmp_path / "peft")]) == 0
    assert "trained with mean pooling" in caplog.text
    with pytest.raises(SystemExit):
        main(["peft", "export", "--adapter", str(tmp_path / "g.safetensors"), "--out", str(tmp_path / "x"),
              "--model", str(tiny_mean_bert_dir), "--task", "regression"])
    assert main(["peft", "export", "--adapter", str(tmp_path / "g.safetensors"), "--model", str(tiny_mean_bert_dir),
                 "--out", str(tmp_path / "nolabels")]) == 2
