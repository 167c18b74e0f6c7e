"""The contract between the round server and an aggregation rule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from edge_client.spec import AdapterSpec
from edge_client.wire import Adapter


@dataclass(frozen=True)
class ClientResult:
    """One client's upload for a round.

    `adapter`: LoRA factors at the client's rank r_k (scale folded in: dW_k = B_k @ A_k).
    `n_samples`: n_k, the client's number of training samples (> 0).
    `indices`: plora only: the global one-rank indices its r_k components are, in upload order.
    """

    adapter: Adapter
    n_samples: int
    indices: tuple[int, ...] | None = None


class AggregationRule(Protocol):
    """What the server calls each round. Every method is pure: no I/O, inputs never mutated."""

    name: str

    def init_global(self, spec: AdapterSpec, global_rank: int, seed: int) -> Adapter:
        """The round-0 global at rank R: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0; dense weights ~ N(0, 0.02), biases 0."""

    def client_view(self, global_: Adapter, rank: int) -> Adapter:
        """What a client of rank r downloads."""

    def assign_indices(
        self, *, global_rank: int, rank: int, round_number: int, client_id: str, seed: int
    ) -> tuple[int, ...] | None:
        """plora: the r global indices a client trains this round; other rules: None."""

    def aggregate(self, global_: Adapter, results: list[ClientResult]) -> Adapter:
        """The new global at the global rank R."""

    def upload_rank_limit(self, assigned_rank: int) -> int:
        """The largest rank an upload from a client with this assigned rank may have."""
