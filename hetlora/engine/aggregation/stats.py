"""Summary numbers of one aggregation for the server's round history (JSON-ready)."""

from __future__ import annotations

import numpy as np

from hetlora.protocol.wire import Adapter
from hetlora.engine.aggregation.contract import ClientResult
from hetlora.engine.aggregation.linalg import update_norm


def aggregate_statistics(global_: Adapter, results: list[ClientResult]) -> dict:
    """Clients, their ranks, samples and n_k/n weights, their update norms, and the new global's size.

    `update_norms[k]` = sqrt(sum over modules ||B_k A_k||_F^2) (what hetlora's sparsity weights use,
    per module); `mean_delta_norm` = mean over modules of ||B A||_F of `global_` (the new global).
    All norms are computed from the factors.
    """
    n = [int(res.n_samples) for res in results]
    total = sum(n)
    return {
        "clients": len(results),
        "ranks": [max((a.shape[0] for a, _ in res.adapter.lora.values()), default=0) for res in results],
        "total_samples": total,
        "sample_weights": [n_k / total for n_k in n],
        "update_norms": [_adapter_norm(res.adapter) for res in results],
        "global_rank": max((a.shape[0] for a, _ in global_.lora.values()), default=0),
        "mean_delta_norm": float(np.mean([update_norm(a, b) for a, b in global_.lora.values()])) if global_.lora else 0.0,
    }


def _adapter_norm(adapter: Adapter) -> float:
    return float(np.sqrt(sum(update_norm(a, b) ** 2 for a, b in adapter.lora.values())))
