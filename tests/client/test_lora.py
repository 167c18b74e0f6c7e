"""LoRALinear against a dense reference, exact wire conversion, spec derivation."""

import numpy as np
import pytest
import torch
from torch import nn

from edge_client.lora import (LoRALinear, extract_adapter, inject_lora, load_adapter, lora_layers, lora_scale,
                              tail_mask, tail_penalty)
from hetlora.models.adapter_spec import derive_spec
from hetlora.models.task_model import load_task_model


def test_forward_matches_dense_weight():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, rank=3, scale=0.5)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    x = torch.randn(4, 6)
    dense = base.weight + 0.5 * layer.lora_B @ layer.lora_A
    torch.testing.assert_close(layer(x), x @ dense.T + base.bias)
    layer.keep_mask = torch.tensor([1.0, 0.0, 1.0])
    dense_kept = base.weight + 0.5 * layer.lora_B[:, [0, 2]] @ layer.lora_A[[0, 2]]
    torch.testing.assert_close(layer(x), x @ dense_kept.T + base.bias)


@pytest.mark.parametrize("alpha,rank", [(16, 4), (16, 8), (16, 31), (16, 64), (8, 3)])
def test_scale_is_a_power_of_two_near_alpha_over_rank(alpha, rank):
    s = lora_scale(alpha, rank)
    assert np.log2(s) == int(np.log2(s))
    assert 0.5 * alpha / rank <= s <= 2 * alpha / rank


def test_tail_penalty_closed_form():
    layer = LoRALinear(nn.Linear(4, 3), rank=4, scale=1.0)
    with torch.no_grad():
        layer.lora_A.copy_(torch.arange(16.0).reshape(4, 4))
        layer.lora_B.copy_(torch.arange(12.0).reshape(3, 4))
    model = nn.Sequential(layer)
    mask = tail_mask(4, 0.5)
    assert mask.tolist() == [0, 0, 1, 1]
    expected = layer.lora_B[:, 2:].norm() * layer.lora_A[2:].norm()
    torch.testing.assert_close(tail_penalty(model, mask), expected)


def test_wire_round_trip_is_exact(tiny_bert_dir):
    model = load_task_model(tiny_bert_dir, "classification", num_labels=3)
    spec = derive_spec(tiny_bert_dir, "classification", num_labels=3)
    inject_lora(model, spec.targets, rank=8, alpha=16)
    assert set(lora_layers(model)) == set(spec.modules)
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.normal_()
            layer.lora_B.normal_()
    dense = {n: p for n, p in model.named_parameters() if n in spec.dense}
    before = {n: ((layer.lora_B * layer.scale) @ layer.lora_A).clone() for n, layer in lora_layers(model).items()}
    wire = extract_adapter(model, dense)
    for n, (a, b) in wire.lora.items():  # the wire product is the effective update, bit for bit
        assert torch.equal(torch.from_numpy(b) @ torch.from_numpy(a), before[n])
    load_adapter(model, wire, dense, alpha=16)
    for n, layer in lora_layers(model).items():
        assert torch.equal((layer.lora_B * layer.scale) @ layer.lora_A, before[n])


def test_spec_matches_the_real_model(tiny_bert_dir, tiny_llama_dir):
    spec = derive_spec(tiny_bert_dir, "classification", num_labels=3)
    assert len(spec.modules) == 2 * 6  # 2 layers x (q, k, v, attn out, ffn in, ffn out)
    assert spec.dense == {"classifier.weight": (3, 32), "classifier.bias": (3,)}
    assert spec.modules["bert.encoder.layer.0.intermediate.dense"].out_features == 64
    llama = derive_spec(tiny_llama_dir, "causal-lm")
    assert len(llama.modules) == 2 * 7 and llama.dense == {}
    assert derive_spec(tiny_bert_dir, "classification", num_labels=3).fingerprint == spec.fingerprint
