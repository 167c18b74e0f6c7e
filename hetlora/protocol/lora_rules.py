"""The LoRA rules client and server must agree on: the training scale and HetLoRA's pruning.

Scale: a layer trains y = W0 x + s B A x; on the wire the scale is folded in (dW = (s B) @ A).
`lora_scale` rounds alpha / r to a power of two, so folding and unfolding it is exact in floating point.
Pruning (HetLoRA self-pruning): after a round whose tail penalty fell, r <- max(min_rank, floor(gamma r)).
"""

from __future__ import annotations

import math


def lora_scale(alpha: float, rank: int) -> float:
    """Training scale: alpha / rank rounded to the nearest power of two (exact to fold)."""
    return float(2.0 ** round(math.log2(alpha / rank)))


def pruned_rank(rank: int, gamma: float, min_rank: int) -> int:
    """HetLoRA's rank after pruning: max(min_rank, floor(gamma * rank)), never above `rank`."""
    return min(rank, max(min_rank, math.floor(gamma * rank)))


def should_prune(rank: int, *, prune_lambda: float, gamma: float, min_rank: int,
                 tail_before: float, tail_after: float) -> bool:
    """Prune when the regulariser is on, the tail term fell during the round and the rule lowers the rank."""
    return prune_lambda > 0 and tail_after < tail_before and pruned_rank(rank, gamma, min_rank) < rank
