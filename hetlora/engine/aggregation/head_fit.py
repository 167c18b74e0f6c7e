"""The head rounds' aggregation: the n_k-weighted mean of the clients' fitted heads; the LoRA factors stay.

A head round (hetlora.protocol.plan, mode head-fit) changes only the dense tensors, whatever the
run's rule: every client fits the head on the same frozen features, so their heads live in one
space and average like FedAvg. The caller bounds the clients' influence first, as in a LoRA round
(hetlora.engine.aggregation.pipeline). Pure numpy.
"""

from __future__ import annotations

import numpy as np

from hetlora.protocol.wire import Adapter
from hetlora.engine.aggregation.base import weighted_mean
from hetlora.engine.aggregation.contract import ClientResult


def average_heads(previous: Adapter, results: list[ClientResult]) -> tuple[Adapter, dict]:
    """(new global, statistics): previous.lora unchanged, dense_t = sum_k (n_k / n) D_k,t."""
    if not results:
        raise ValueError("no client heads to average; a head round needs at least one upload")
    n = np.array([res.n_samples for res in results], dtype=np.float64)
    dense = {name: weighted_mean([res.adapter.dense[name] for res in results], n) for name in previous.dense}
    change = float(np.sqrt(sum(np.sum((dense[k].astype(np.float64) - previous.dense[k]) ** 2) for k in dense)))
    statistics = {"clients": len(results), "total_samples": int(n.sum()), "sample_weights": list(n / n.sum()),
                  "head_change": change}
    return Adapter(lora=previous.lora, dense=dense, meta=dict(previous.meta)), statistics
