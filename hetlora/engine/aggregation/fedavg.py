"""FedAvg of the factors: the homogeneous naive baseline."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hetlora.protocol.wire import Adapter
from hetlora.engine.aggregation.base import BaseRule, check_rank, rank_of
from hetlora.engine.aggregation.contract import ClientResult
from hetlora.engine.aggregation.mixing import Part, mix_components


@dataclass(frozen=True)
class FedAvgRule(BaseRule):
    """B = sum_k (n_k/n) B_k, A = sum_k (n_k/n) A_k, every client at the global rank R.

    Biased by design (mean(B) @ mean(A) != mean(B @ A)): the baseline the other rules beat.
    Clients download the full global and must upload at rank R.
    """

    name = "fedavg"

    def planned_rank(self, tier_rank: int, global_rank: int) -> int:
        """Every client at the global rank, whatever its tier allows (homogeneous)."""
        return global_rank

    def min_upload_rank(self, rank: int) -> int:
        return rank

    def client_view(self, global_: Adapter, rank: int) -> Adapter:
        """The full global; `rank` must equal the global rank."""
        _require_global_rank("a fedavg client", rank, rank_of(global_))
        return super().client_view(global_, rank)

    def component_indices(self, result: ClientResult, upload_rank: int, global_rank: int) -> tuple[int, ...]:
        _require_global_rank(f"upload from {result.adapter.meta.get('client_id', 'a client')}", upload_rank, global_rank)
        return tuple(range(upload_rank))

    def aggregate_module(self, previous, parts: list[Part], n: np.ndarray):
        p = n / n.sum()
        return mix_components(parts, [np.full(len(idx), p_k) for (_, _, idx), p_k in zip(parts, p)], previous,
                              keep_uncovered=False)


def _require_global_rank(who: str, rank: int, global_rank: int) -> None:
    check_rank("rank", rank, maximum=None)
    if rank != global_rank:
        raise ValueError(f"{who} has rank {rank}, but fedavg needs every client at the global rank {global_rank}; "
                         "use hetlora, hlora or plora for mixed ranks")
