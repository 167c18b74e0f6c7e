"""The plan's optimiser, run in the client on the gradients an exported artifact returns.

An artifact computes the loss and the gradients of its trainable tensors (LoRA factors and head,
small); the update is torch's, built by edge_client.training.make_optimizer / make_schedule as the
torch backend builds it: LoRA factors at `lr`, the head at `head_lr`, the plan's optimiser, weight
decay and per-step schedule. So every backend follows the plan, and the artifacts hold no optimiser.
"""

from __future__ import annotations

import torch

from edge_client.training import make_optimizer, make_schedule
from hetlora.protocol.settings import TrainingSettings


class ClientOptimizer:
    """One round's optimiser over `params` (tensors updated in place: they share memory with the runtime)."""

    def __init__(self, params: dict[str, torch.Tensor], head: set[str], cfg: TrainingSettings):
        self.params = params
        factors = [p for name, p in params.items() if name not in head]
        self.optimizer = make_optimizer(factors, [params[name] for name in head], cfg)
        self.schedule = make_schedule(self.optimizer, cfg)

    def step(self, gradients: dict[str, torch.Tensor]) -> None:
        """Apply one update from `gradients` (name -> tensor, every parameter) and advance the schedule."""
        for name, p in self.params.items():
            p.grad = gradients[name]
        self.optimizer.step()
        self.schedule.step()
        for p in self.params.values():
            p.grad = None
