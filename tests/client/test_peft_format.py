"""PEFT export and the merged-weight evaluator, both against the project's own LoRA model."""

import json

import numpy as np
import pytest
import torch

from edge_client.data import Examples
from edge_client.evaluate import Evaluator, macro_f1
from hetlora.models.adapter_spec import derive_spec
from hetlora.models.task_model import load_task_model, load_tokenizer
from hetlora.protocol.peft_format import save_peft
from hetlora.protocol.wire import Adapter
from hetlora.errors import UserError
from tests.helpers.adapters import PEFT_TEXTS, our_logits, random_adapter

TEXTS = PEFT_TEXTS
LABELS = ["a", "b", "c"]


@pytest.mark.slow
@pytest.mark.parametrize("task,fixture,num_labels", [("classification", "tiny_bert_dir", 3),
                                                     ("causal-lm", "tiny_llama_dir", None)])
def test_peft_loads_the_export_with_the_same_logits(request, tmp_path, task, fixture, num_labels):
    from peft import PeftModel

    model_dir = request.getfixturevalue(fixture)
    adapter = random_adapter(derive_spec(model_dir, task, num_labels=num_labels), rank=6, seed=1, scale=0.3)
    expected, enc = our_logits(model_dir, task, adapter, num_labels)
    save_peft(adapter, tmp_path / "peft", task)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 6
    base = load_task_model(model_dir, task, num_labels)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    with torch.no_grad():
        got = peft_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    assert not torch.allclose(got, load_task_model(model_dir, task, num_labels).eval()(**enc).logits, atol=1e-3)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_evaluator_merged_weights_match_the_lora_model(tiny_bert_dir):
    adapter = random_adapter(derive_spec(tiny_bert_dir, "classification", num_labels=3), rank=4, seed=2, scale=0.3)
    reference, _ = our_logits(tiny_bert_dir, "classification", adapter, 3)
    predicted = reference.argmax(-1).numpy()
    truth = np.array([0, 1, 1])
    metrics = Evaluator(tiny_bert_dir, "classification", LABELS).evaluate(
        adapter, Examples("classification", tuple(TEXTS), tuple(truth)), seq_len=32, batch_size=2)
    assert metrics["accuracy"] == pytest.approx(np.mean(predicted == truth))
    assert metrics["macro_f1"] == pytest.approx(macro_f1(truth, predicted))
    expected_loss = torch.nn.functional.cross_entropy(reference, torch.from_numpy(truth)).item()
    assert metrics["loss"] == pytest.approx(expected_loss, abs=1e-5)


@pytest.mark.slow
def test_evaluator_perplexity_and_swapping_adapters(tiny_llama_dir):
    spec = derive_spec(tiny_llama_dir, "causal-lm")
    evaluator = Evaluator(tiny_llama_dir, "causal-lm")
    data = Examples("causal-lm", ("", ""), responses=tuple(TEXTS[:2]))
    zero = Adapter(lora={n: (np.zeros((2, m.in_features), np.float32), np.zeros((m.out_features, 2), np.float32))
                         for n, m in spec.modules.items()})
    base = evaluator.evaluate(zero, data, seq_len=32)
    changed = evaluator.evaluate(random_adapter(spec, 2, 3, scale=0.3), data, seq_len=32)
    again = evaluator.evaluate(zero, data, seq_len=32)
    assert base["perplexity"] == pytest.approx(np.exp(base["nll"]))
    assert changed["nll"] != pytest.approx(base["nll"])
    assert again["nll"] == pytest.approx(base["nll"], abs=1e-6)  # W0 restored between adapters


def test_evaluator_rejects_a_headless_or_foreign_adapter(tiny_bert_dir):
    evaluator = Evaluator(tiny_bert_dir, "classification", LABELS)
    data = Examples("classification", ("hi",), (0,))
    with pytest.raises(UserError, match="head"):
        evaluator.evaluate(Adapter(lora={}), data)
    foreign = Adapter(lora={"model.layers.0.q_proj": (np.zeros((1, 4), np.float32), np.zeros((4, 1), np.float32))},
                      dense={n: np.zeros(s, np.float32) for n, s in
                             derive_spec(tiny_bert_dir, "classification", num_labels=3).dense.items()})
    with pytest.raises(UserError, match="not a linear layer"):
        evaluator.evaluate(foreign, data)


def test_evaluate_command_prints_the_evaluator_metrics(tiny_bert_dir, tmp_path, capsys):
    from hetlora.protocol.wire import encode
    from hetlora.cli import main

    adapter = random_adapter(derive_spec(tiny_bert_dir, "classification", num_labels=3), rank=2, seed=4, scale=0.3)
    (tmp_path / "a.safetensors").write_bytes(encode(adapter))
    (tmp_path / "labels.json").write_text(json.dumps(LABELS))
    (tmp_path / "test.csv").write_text("text,label\n" + "".join(f"{t},{l}\n" for t, l in zip(TEXTS, "abb")))
    args = ["evaluate", "--model", str(tiny_bert_dir), "--adapter", str(tmp_path / "a.safetensors"),
            "--test", str(tmp_path / "test.csv"), "--seq-len", "32"]
    assert main(args + ["--labels", str(tmp_path / "labels.json"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = Evaluator(tiny_bert_dir, "classification", LABELS).evaluate(
        adapter, Examples("classification", tuple(TEXTS), (0, 1, 1)), seq_len=32)
    assert printed == pytest.approx(expected)
    assert main(args) == 2
    assert "pass --labels FILE" in capsys.readouterr().err


@pytest.mark.slow
def test_mean_pooling_model_and_its_peft_export(tiny_mean_bert_dir, tmp_path):
    """A checkpoint declaring mean pooling gets it (recorded in the spec); its features are the
    L2-normalised masked mean of the encoder's states; PEFT loads the export onto the same model exactly."""
    from peft import PeftModel

    spec = derive_spec(tiny_mean_bert_dir, "classification", num_labels=3)
    assert spec.pooling == "mean" and derive_spec(tiny_mean_bert_dir, "classification", num_labels=3,
                                                  pooling="native").fingerprint != spec.fingerprint
    model = load_task_model(tiny_mean_bert_dir, "classification", 3).eval()
    enc = load_tokenizer(tiny_mean_bert_dir)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.bert(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        mean = (hidden * mask).sum(1) / mask.sum(1)
        expected_features = mean / mean.norm(dim=-1, keepdim=True)
        torch.testing.assert_close(model(**enc).logits, model.classifier(expected_features))

    adapter = random_adapter(spec, rank=4, seed=2, scale=0.3)
    expected, enc = our_logits(tiny_mean_bert_dir, "classification", adapter, 3)
    save_peft(adapter, tmp_path / "peft", "classification")
    peft_model = PeftModel.from_pretrained(load_task_model(tiny_mean_bert_dir, "classification", 3),
                                           tmp_path / "peft").eval()
    with torch.no_grad():
        got = peft_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
