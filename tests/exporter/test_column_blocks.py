"""exporter.column_blocks: frozen linear maps as L2-sized weight blocks, the same function and gradients.

References: the unblocked nn.Linear; for the exported program, the eager training graph in torch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from exporter.column_blocks import Blocking, ColumnBlockedLinear, block_rows, column_blocked


@pytest.mark.parametrize("bias", [False, True])
def test_blocked_linear_equals_the_linear(bias):
    torch.manual_seed(0)
    linear = nn.Linear(12, 10, bias=bias).requires_grad_(False)
    blocked = ColumnBlockedLinear(linear, rows=4)  # blocks of 4, 4 and 2 rows
    assert [tuple(w.shape) for w in blocked.blocks] == [(4, 12), (4, 12), (2, 12)]
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(blocked(x), linear(x), rtol=1e-6, atol=1e-6)  # GEMM kernels differ by shape


@pytest.mark.parametrize(("out_features", "in_features", "rows"), [
    (1536, 576, 256),  # SmolLM2 gate/up: 3.4 MiB in six blocks
    (576, 1536, 96),   # down
    (576, 576, 192),   # q/o: three blocks
    (192, 576, 192),   # k/v: 432 KiB, one block
    (1536, 384, 384),  # MiniLM's MLP
])
def test_block_rows_fit_the_budget(out_features, in_features, rows):
    budget = Blocking().block_bytes
    assert block_rows(out_features, in_features, budget) == rows
    assert rows * in_features * 4 <= budget


def test_only_frozen_unshared_linears_are_blocked_and_all_come_back(tiny_llama_dir):
    from exporter.training_graph import build_training_graph

    graph = build_training_graph(tiny_llama_dir, "causal-lm", 4, ("q_proj", "v_proj"), 16.0)
    before = dict(graph.model.named_modules())
    with column_blocked(graph.model, Blocking(split_above=1024, block_bytes=1024)) as swapped:
        blocked = {n for n, m in graph.model.named_modules() if isinstance(m, ColumnBlockedLinear)}
        # per layer: q and v (the LoRA layers' bases), k, o, gate, up, down; the tied output head is left whole
        assert swapped == len(blocked) == 2 * 7
        assert not any("lm_head" in n for n in blocked) and "model.layers.0.self_attn.q_proj.base" in blocked
        assert all(not p.requires_grad for n, p in graph.model.named_parameters() if ".blocks." in n)
    assert dict(graph.model.named_modules()) == before


def test_exported_blocked_program_trains_like_torch(tiny_llama_dir, tmp_path):
    """Every frozen linear of the tiny Llama in blocks of at most 1 KiB: the ExecuTorch program's loss and LoRA
    gradients equal the eager (unblocked) graph's, and frozen_weights.ptd stores the blocks by name."""
    from executorch.exir._serialize._cord import Cord
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer
    from executorch.extension.pybindings import _C

    from edge_client.backends.executorch_backend import GRADIENTS_START, NAMES, PARAMETERS_START
    from exporter.executorch_export import export_executorch
    from exporter.training_graph import build_training_graph, example_inputs

    graph = build_training_graph(tiny_llama_dir, "causal-lm", 4, ("q_proj", "v_proj"), 16.0)
    for name, p in graph.named_parameters():  # LoRA B non-zero, so every gradient path carries signal
        if p.requires_grad:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    inputs = example_inputs("causal-lm", 4, 2, 16, graph.model.config.vocab_size)
    files = export_executorch(graph, inputs, tmp_path / "r4.pte", delegate="xnnpack", what="tiny", first=True,
                              blocking=Blocking(split_above=1024, block_bytes=1024))
    stored = FlatTensorSerializer().deserialize(Cord(files["weights"].read_bytes())).named_data
    assert any(".blocks." in key for key in stored) and not any(key.endswith("up_proj.weight") for key in stored)

    module = _C._load_for_executorch(str(files["program"]), data_path=str(files["weights"]))
    outputs = module.run_method("forward", list(inputs))
    grads_at, params_at = (module.run_method(m, ())[0] for m in (GRADIENTS_START, PARAMETERS_START))
    got = dict(zip(module.run_method(NAMES, ()), outputs[grads_at:params_at]))

    loss = graph(*inputs)[0]
    loss.backward()
    want = {name: p.grad for name, p in graph.named_parameters() if p.requires_grad}
    assert float(outputs[0]) == pytest.approx(float(loss.detach()), abs=1e-5)
    assert set(got) == set(want)
    for name, grad in want.items():
        np.testing.assert_allclose(got[name].numpy(), grad.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
