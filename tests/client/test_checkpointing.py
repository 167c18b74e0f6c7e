"""Activation checkpointing in the torch backend: the same round, each layer run again in backward (what it saves:
tests/profiles/test_tiers.py and benchmarks/bench_memory.py)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from edge_client.checkpointing import set_activation_checkpointing
from edge_client.data import Examples
from edge_client.lora import lora_layers
from edge_client.training import TorchTrainer
from hetlora.errors import UserError
from hetlora.models.adapter_spec import derive_spec
from hetlora.protocol.settings import TrainingSettings
from tests.helpers.adapters import random_adapter

TEXTS = ("how do I activate my new card", "my card payment was declined at the shop",
         "what is the exchange rate for euros", "federated learning keeps private data on the device")
CHAT = Examples("causal-lm", ("", "hello", "", "what rate"), responses=TEXTS)
CLASSES = Examples("classification", TEXTS, (0, 0, 1, 1))
CFG = TrainingSettings(steps=3, batch_size=2, seq_len=48, lr=1e-2, seed=1)


def trained(model_dir, task: str, examples: Examples, checkpointing: bool, dropout: bool = False):
    labels = ["card", "rate"] if task == "classification" else None
    trainer = TorchTrainer(model_dir, task, labels)
    spec = derive_spec(model_dir, task, num_labels=2 if labels else None)
    start = random_adapter(spec, 4, seed=7, b_scale=0.05, dense=False)
    first = next(iter(lora_layers(trainer.model).values()))  # a module inside the first transformer layer
    calls = []
    first.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    cfg = replace(CFG, activation_checkpointing=checkpointing, dropout=dropout)
    result = trainer.train_round(start, examples, cfg, rank=4)
    return result, calls


@pytest.mark.parametrize("fixture, task, examples", [("tiny_llama_dir", "causal-lm", CHAT),
                                                     ("tiny_bert_dir", "classification", CLASSES)])
def test_a_checkpointed_round_uploads_the_same_update_and_runs_each_layer_again_in_backward(
        request, fixture, task, examples):
    """The tiny BERT has dropout 0.1 in its config: equal updates also show the round's eval mode survives."""
    model_dir = request.getfixturevalue(fixture)
    plain, plain_calls = trained(model_dir, task, examples, checkpointing=False)
    checkpointed, calls = trained(model_dir, task, examples, checkpointing=True)
    assert checkpointed.loss_after == pytest.approx(plain.loss_after, rel=1e-5)
    for name, (a, b) in plain.adapter.lora.items():
        a2, b2 = checkpointed.adapter.lora[name]
        np.testing.assert_allclose(a2, a, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(b2, b, rtol=1e-4, atol=1e-6)
    # Each training step runs the first layer twice (once more in backward); evaluation passes run it once.
    steps = CFG.steps
    assert sum(plain_calls) == steps and sum(calls) == 2 * steps
    assert len(calls) - sum(calls) == len(plain_calls) - sum(plain_calls)


def test_a_model_without_transformer_layers_cannot_be_checkpointed():
    with pytest.raises(UserError, match="no transformer layers that support activation checkpointing"):
        set_activation_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2)), True)
    set_activation_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2)), False)  # nothing to turn off: fine
