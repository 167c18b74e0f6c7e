"""The exported graphs' head loss against the dense cross-entropy it rewrites."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from edge_client.objective import IGNORE, head_loss_sum_and_count


def dense_reference(hidden, head, targets):
    """Summed cross-entropy of the full logits over the kept targets, and their number."""
    return F.cross_entropy(head(hidden), targets, ignore_index=IGNORE, reduction="sum"), (targets != IGNORE).sum()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("logit_scale", [1.0, 400.0])  # 400: logits far beyond exp's float32 range
def test_head_loss_and_its_gradients_equal_the_dense_cross_entropy(bias, logit_scale):
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=bias)
    hidden = (torch.randn(12, 16) * logit_scale).requires_grad_()
    targets = torch.randint(0, 50, (12,))
    targets[[0, 5, 6]] = IGNORE
    got, count = head_loss_sum_and_count(hidden, head, targets)
    got_grads = torch.autograd.grad(got, [hidden, *head.parameters()])
    expected, expected_count = dense_reference(hidden, head, targets)
    expected_grads = torch.autograd.grad(expected, [hidden, *head.parameters()])
    assert torch.isfinite(got) and int(count) == int(expected_count) == 9
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_head_loss_by_hand_on_two_rows():
    head = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    hidden = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    # row 0: logits (1, 2, 3), target 1; row 1 is ignored
    total, count = head_loss_sum_and_count(hidden, head, torch.tensor([1, IGNORE]))
    assert int(count) == 1
    assert total.detach().item() == pytest.approx(math.log(math.e + math.e ** 2 + math.e ** 3) - 2.0, rel=1e-6)


def test_a_batch_without_targets_has_zero_loss_and_zero_gradient():
    head = nn.Linear(8, 20)
    hidden = torch.randn(4, 8, requires_grad=True)
    total, count = head_loss_sum_and_count(hidden, head, torch.full((4,), IGNORE))
    total.backward()
    assert total.detach().item() == 0.0 and int(count) == 0
    assert not hidden.grad.abs().any()
