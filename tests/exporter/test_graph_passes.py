"""exporter.graph_passes on a joint forward + backward graph: same outputs and gradients, rewritten ops.

Reference: the unmodified joint program run on the same inputs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from exporter.graph_passes import drop_inverse_permutes, frozen_parameters, split_addmm

aten = torch.ops.aten


class TwoLinears(nn.Module):
    """A frozen linear then a trainable one; returns the loss first, as the exporter requires."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.frozen = nn.Linear(6, 5).requires_grad_(False)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        y = self.head(torch.tanh(self.frozen(x)))
        return (y * y).mean(), y.detach()


class TrainableThenFrozen(nn.Module):
    """A trainable linear then a frozen one: the frozen weight is read forward and, for the gradient, backward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(6, 5)
        self.frozen = nn.Linear(5, 3).requires_grad_(False)

    def forward(self, x):
        y = self.frozen(torch.tanh(self.head(x)))
        return (y * y).mean(), y.detach()


def joint_program(module=TwoLinears):
    from torch.export import export
    from torch.export.experimental import _export_forward_backward

    return _export_forward_backward(export(module(), (torch.randn(4, 6),), strict=False))


def targets(program) -> list:
    return [n.target for n in program.graph.nodes if n.op == "call_function"]


def run(program, x):
    """Every output of the joint graph (loss, outputs, gradients), called with its parameters and `x`."""
    from torch.export.graph_signature import InputKind

    args = [program.state_dict[spec.target] if spec.kind == InputKind.PARAMETER else x
            for spec in program.graph_signature.input_specs]
    return [t.detach() for t in program.graph_module(*args)]


def test_passes_keep_loss_and_gradients():
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    reference = joint_program()
    want = run(reference, x)
    program = joint_program()
    frozen = frozen_parameters(program)
    assert {program.graph_signature.inputs_to_parameters[n.name] for n in frozen} == {"frozen.weight", "frozen.bias"}
    assert split_addmm(program, linearize=frozen) == 2  # the frozen addmm -> linear, the head's -> mm + add
    drop_inverse_permutes(program)
    ops = targets(program)
    assert aten.addmm.default not in ops and ops.count(aten.linear.default) == 1
    got = run(program, x)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_drop_inverse_permutes_only_drops_identities():
    program = joint_program()
    before = targets(program).count(aten.permute.default)
    dropped = drop_inverse_permutes(program)
    after = targets(program).count(aten.permute.default)
    assert dropped >= 1 and after <= before - dropped  # an inner permute left unused is removed too
    for node in program.graph.nodes:  # no permute of a permute that undoes it is left
        if node.target == aten.permute.default and getattr(node.args[0], "target", None) == aten.permute.default:
            p, q = list(node.args[0].args[1]), list(node.args[1])
            assert [p[i] for i in q] != list(range(len(p)))


@pytest.mark.parametrize("linearize", [False, True])
def test_split_without_frozen_weights_leaves_no_linear(linearize):
    program = joint_program()
    split_addmm(program, linearize=frozen_parameters(program) if linearize else set())
    assert (aten.linear.default in targets(program)) == linearize


class RMSNormMLP(nn.Module):
    """RMSNorm (x.pow(2): its backward has pow(x, 1)), a frozen SiLU MLP and a trainable head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(6, 8).requires_grad_(False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        y = self.head(nn.functional.silu(self.up(x)) * x.pow(2).sum(-1, keepdim=True))
        return (y * y).mean(), y.detach()


def test_simplify_elementwise_drops_pow_exactly():
    from exporter.graph_passes import simplify_elementwise

    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    want = run(joint_program(RMSNormMLP), x)
    program = joint_program(RMSNormMLP)
    assert aten.pow.Tensor_Scalar in targets(program)
    assert simplify_elementwise(program) >= 2  # pow(x, 2) forward, pow(x, 1) in its backward
    assert all(node.target != aten.pow.Tensor_Scalar or node.args[1] not in (1, 2)
               for node in program.graph.nodes if node.op == "call_function")
    got = run(program, x)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


class WideFrozenHead(nn.Module):
    """A trainable linear feeding a frozen 300-way head: the head's backward contracts over 300 outputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 5)
        self.head = nn.Linear(5, 300, bias=False).requires_grad_(False)

    def forward(self, x):
        y = torch.log_softmax(self.head(torch.tanh(self.body(x))), -1)
        return -y[:, 0].mean(), y.detach()


def test_split_long_contractions_keeps_loss_and_gradients():
    from exporter.graph_passes import split_long_contractions

    def contractions(program):
        return [n.args[0].meta["val"].shape[1] for n in program.graph.nodes if n.target == aten.mm.default]

    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    want = run(joint_program(WideFrozenHead), x)
    program = joint_program(WideFrozenHead)
    assert max(contractions(program)) == 300  # d(hidden) = d(logits) @ W_head
    assert split_long_contractions(program, longer_than=100, chunk=64) == 1
    assert max(contractions(program)) <= 100
    assert sorted(contractions(program)).count(64) == 4 and 300 - 4 * 64 in contractions(program)  # a shorter last chunk
    got = run(program, x)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_simplify_elementwise_drops_aliases():
    """ExecuTorch runs an alias as a copy; log-softmax's backward keeps two of its (rows, classes) output."""
    from exporter.graph_passes import simplify_elementwise

    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    want = run(joint_program(WideFrozenHead), x)
    program = joint_program(WideFrozenHead)

    def inner_aliases():  # an alias the graph returns stays: an output must be a tensor of its own
        return [n for n in program.graph.nodes if n.target == aten.alias.default and "output" not in
                {user.op for user in n.users}]

    assert inner_aliases()
    simplify_elementwise(program)
    assert not inner_aliases()
    for g, w in zip(run(program, x), want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
