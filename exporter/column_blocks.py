"""Large frozen linear maps split into output-column blocks that fit a core's L2 cache, for XNNPACK.

XNNPACK packs a run-time weight per call and walks the packed weight once for every 7-row block of
the input; a weight larger than L2 is streamed from L3 or memory each time. As blocks of at most
`block_bytes`, y = cat_j(x W_j^T + b_j) and, backward, dx = sum_j g_j W_j, each product's weight stays
in L2, at the cost of the cat, the slices of g and the sums.
Measured on the 2-core Xeon (2 MiB L2 per core), 2 threads:
- single-op programs at SmolLM2's 512 tokens: the MLP's 576 x 1536 weight (3.4 MiB) as one GEMM ran
  1.47x torch forward and 1.79x backward; as six blocks of 256 rows, 1.17x and about 1.4x;
- whole training steps, each program against its unblocked self in one process: SmolLM2 8 x 64 0.96x,
  MiniLM 16 x 64 (MLP weights of 2.25 MiB, 1,024 tokens) 1.05x, slower. So only weights over
  `split_above` (3 MiB, between the two) are split.
The blocks are separate frozen parameters, so `frozen_weights.ptd` stores each block under its own
name and nothing is sliced or copied at run time. Weights shared with another module (a tied output
head) are left whole: splitting them would store them twice.
"""

from __future__ import annotations

import collections
import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class Blocking:
    """Split frozen weights of more than `split_above` bytes into blocks of at most `block_bytes`."""

    split_above: int = 3 * 2**20
    block_bytes: int = 640 * 1024  # a third of the 2 MiB L2 per core measured on; 256-row blocks of SmolLM2's MLP


class ColumnBlockedLinear(nn.Module):
    """`linear` (frozen) as row blocks of its weight: forward cat_j(x W_j^T + b_j), equal to linear(x)."""

    def __init__(self, linear: nn.Linear, rows: int):
        super().__init__()
        self.blocks = nn.ParameterList(nn.Parameter(w.detach().clone(), requires_grad=False)
                                       for w in linear.weight.split(rows))
        bias = linear.bias
        self.biases = None if bias is None else nn.ParameterList(
            nn.Parameter(b.detach().clone(), requires_grad=False) for b in bias.split(rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        biases = self.biases if self.biases is not None else [None] * len(self.blocks)
        return torch.cat([F.linear(x, w, b) for w, b in zip(self.blocks, biases)], -1)


def block_rows(out_features: int, in_features: int, max_block_bytes: int) -> int:
    """Rows per block: the fewest equal blocks of float32 rows that each hold at most `max_block_bytes`."""
    blocks = math.ceil(out_features * in_features * 4 / max_block_bytes)
    return math.ceil(out_features / blocks)


@contextlib.contextmanager
def column_blocked(model: nn.Module, blocking: Blocking = Blocking()):
    """Within the block, every frozen, unshared nn.Linear of `model` larger than `blocking.split_above` is a
    ColumnBlockedLinear; the original modules are put back on exit."""
    uses = collections.Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (isinstance(child, nn.Linear) and not child.weight.requires_grad and uses[id(child.weight)] == 1
                    and child.weight.numel() * 4 > blocking.split_above):
                rows = block_rows(child.out_features, child.in_features, blocking.block_bytes)
                setattr(parent, name, ColumnBlockedLinear(child, rows))
                swapped.append((parent, name, child))
    try:
        yield len(swapped)
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
