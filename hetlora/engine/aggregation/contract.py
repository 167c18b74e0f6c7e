"""The contract between the round server and an aggregation rule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from hetlora.protocol.plan import ClientPlan, Tier
from hetlora.protocol.settings import TrainingSettings
from hetlora.protocol.spec import AdapterSpec
from hetlora.protocol.wire import Adapter


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

    def configure(self, *, round_number: int, client_key: str, tier: Tier, global_rank: int, seed: int,
                  training: TrainingSettings, stage: str = "lora", class_counts=None) -> ClientPlan:
        """One client's plan for a round (rank, mode, training settings, plora's indices), from its tier."""

    def aggregate(self, global_: Adapter, results: list[ClientResult]) -> Adapter:
        """The new global at the global rank R."""
