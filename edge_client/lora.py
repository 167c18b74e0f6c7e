"""LoRA layers for the torch backend, and the conversions to and from the wire format.

A `LoRALinear` wraps a frozen `nn.Linear` W0 (out x in):
    y = W0 x + b + s * B (m * (A x)),   A (r x in), B (out x r), m the keep mask (r,)
with s the training scale. On the wire the scale is folded in: dW = (s B) @ A.
`lora_scale` rounds alpha / r to a power of two, so folding and unfolding the scale is
exact in floating point and a client's weights survive a wire round trip bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from hetlora.models.folders import matches_target
from hetlora.protocol.lora_rules import lora_scale
from hetlora.protocol.wire import Adapter


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (see module docstring)."""

    def __init__(self, base: nn.Linear, rank: int, scale: float):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.scale = scale
        dtype, device = base.weight.dtype, base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(rank, base.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=dtype, device=device))
        # Optional (r,) tensor: 1 keeps a rank component, 0 silences it (pruned ranks in fixed-shape
        # artifacts). A plain attribute, not a buffer, so an exported graph can take it as an input.
        self.keep_mask: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The scale multiplies the r-wide activations, not the out-wide output: fewer flops, and the
        # same bits, since s is a power of two.
        z = F.linear(x, self.lora_A) * self.scale
        if self.keep_mask is not None:
            z = z * self.keep_mask
        return self.base(x) + F.linear(z, self.lora_B)

    def resize(self, rank: int, scale: float) -> None:
        """Set a new rank (zeros) and scale; call before loading factors of that rank."""
        dtype, device = self.lora_A.dtype, self.lora_A.device
        self.lora_A = nn.Parameter(torch.zeros(rank, self.base.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.base.out_features, rank, dtype=dtype, device=device))
        self.scale = scale
        self.keep_mask = None


def inject_lora(model: nn.Module, targets, rank: int, alpha: float) -> dict[str, LoRALinear]:
    """Replace every targeted nn.Linear by a LoRALinear of `rank`; freeze everything else.

    Returns the LoRA layers keyed by module name (the wire names).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and matches_target(n, targets)]
    if not names:
        raise ValueError(f"no nn.Linear module matches the LoRA targets {list(targets)}")
    scale = lora_scale(alpha, rank)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, scale))
    return lora_layers(model)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def set_rank(model: nn.Module, rank: int, alpha: float) -> None:
    """Resize every LoRA layer to `rank` (zeroed), with the scale for that rank."""
    scale = lora_scale(alpha, rank)
    for layer in lora_layers(model).values():
        layer.resize(rank, scale)


@torch.no_grad()
def load_adapter(model: nn.Module, adapter: Adapter, dense_params: dict[str, nn.Parameter], alpha: float) -> None:
    """Load wire factors into the model: A = A_wire, B = B_wire / s (exact, s a power of two).

    Layers are resized to the adapter's rank. `dense_params` maps dense wire names to the
    model parameters they fill (e.g. the classification head).
    """
    set_rank(model, adapter.rank, alpha)
    layers = lora_layers(model)
    for name, (a, b) in adapter.lora.items():
        layer = layers[name]
        layer.lora_A.copy_(torch.from_numpy(np.asarray(a)))
        layer.lora_B.copy_(torch.from_numpy(np.asarray(b)) / layer.scale)
    for name, t in adapter.dense.items():
        dense_params[name].copy_(torch.from_numpy(np.asarray(t)))


@torch.no_grad()
def extract_adapter(model: nn.Module, dense_params: dict[str, nn.Parameter], meta: dict | None = None) -> Adapter:
    """Read the model's factors out in wire form: A, s * B (float32 numpy)."""
    lora = {
        name: (layer.lora_A.detach().float().cpu().numpy().copy(),
               (layer.lora_B * layer.scale).detach().float().cpu().numpy())
        for name, layer in lora_layers(model).items()
    }
    dense = {name: p.detach().float().cpu().numpy().copy() for name, p in dense_params.items()}
    return Adapter(lora=lora, dense=dense, meta=dict(meta or {}))


def tail_penalty(model: nn.Module, tail_mask: torch.Tensor) -> torch.Tensor:
    """HetLoRA self-pruning regulariser: sum over layers of ||B[:, tail]||_F * ||A[tail, :]||_F.

    `tail_mask` (r,) is 1 on the tail ranks p..r-1 (p = floor(gamma * r)) and 0 elsewhere; a mask
    rather than a slice so fixed-shape exported graphs compute the same expression.
    """
    terms = [(layer.lora_B * tail_mask).norm() * (layer.lora_A * tail_mask[:, None]).norm()
             for layer in lora_layers(model).values()]
    return torch.stack(terms).sum()


def tail_mask(rank: int, gamma: float) -> torch.Tensor:
    """(rank,) float mask of the tail ranks floor(gamma * rank) .. rank-1."""
    mask = torch.zeros(rank)
    mask[math.floor(gamma * rank):] = 1.0
    return mask
