"""Pure numpy operations on wire Adapters that the local round needs (any backend).

truncate: keep rank components 0..r-1 (HetLoRA distribution and self-pruning).
select:   keep the components `indices`, in that order (Fed-PLoRA's trained subset).
"""

from __future__ import annotations

import numpy as np

from hetlora.protocol.wire import Adapter
from hetlora.errors import UserError


def truncate(adapter: Adapter, rank: int) -> Adapter:
    """A[:r, :], B[:, :r] for every module; dense tensors and meta are kept."""
    if not 0 < rank <= adapter.rank:
        raise UserError(f"cannot truncate a rank-{adapter.rank} adapter to rank {rank}")
    return select(adapter, list(range(rank)))


def select(adapter: Adapter, indices) -> Adapter:
    """A[indices, :], B[:, indices] for every module, in the order of `indices`."""
    idx = check_indices(indices, adapter.rank)
    lora = {name: (np.ascontiguousarray(a[idx]), np.ascontiguousarray(b[:, idx])) for name, (a, b) in adapter.lora.items()}
    return Adapter(lora=lora, dense={k: v.copy() for k, v in adapter.dense.items()}, meta=dict(adapter.meta))


def check_indices(indices, rank: int) -> list[int]:
    """Distinct component indices within 0..rank-1, or a UserError saying which one is wrong."""
    idx = [int(i) for i in indices]
    if not idx:
        raise UserError("no rank components selected")
    if len(set(idx)) != len(idx):
        raise UserError(f"selected rank components {idx} repeat an index")
    bad = [i for i in idx if not 0 <= i < rank]
    if bad:
        raise UserError(f"rank component {bad[0]} is outside 0..{rank - 1}")
    return idx
