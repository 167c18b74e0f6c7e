"""Fed-PLoRA (arXiv 2602.16936): R one-rank adapters, each averaged over the clients that trained it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from hetlora.protocol.wire import Adapter
from hetlora.engine.aggregation.base import BaseRule, check_rank, rank_of
from hetlora.engine.aggregation.contract import ClientResult
from hetlora.engine.aggregation.mixing import Part, mix_component_updates


@dataclass(frozen=True)
class PLoRARule(BaseRule):
    """The global is R one-rank adapters (b_j, a_j) = (B[:, j], A[j, :]).

    Each round the server assigns client k a set I_k of r_k indices; the client folds the
    others into its frozen weights, trains (b_j, a_j) for j in I_k and uploads them in the
    order of I_k. Every client of the round counts in every index, with a zero change where
    it did not train it (the paper's "rank-wise" average):
        b_j <- b_j + sum_{k : j in I_k} (n_k / n) (b_j^(k) - b_j)   (same for a_j),  n = sum_k n_k
    so the global moves by the mean of the clients' changes. (A mean over the trainers of j
    alone adds up the changes of clients that trained disjoint indices: on the chat task that
    sum overshoots, and the global's perplexity doubled in one round.)
    Clients download the full global (they need every component to fold).
    """

    name = "plora"

    def client_view(self, global_: Adapter, rank: int) -> Adapter:
        """The full global at rank R (`rank`, at most R, is the number of indices the client trains)."""
        check_rank("rank", rank, maximum=rank_of(global_))
        return super().client_view(global_, rank_of(global_))

    mode = "plora"

    def upload_start(self, global_: Adapter, rank: int, indices) -> Adapter:
        """The components `indices` of the global, in that order (what the client trains and uploads)."""
        idx = list(indices)
        lora = {name: (a[idx].copy(), b[:, idx].copy()) for name, (a, b) in global_.lora.items()}
        return Adapter(lora=lora, dense=dict(global_.dense), meta=dict(global_.meta))

    def planned_indices(self, *, global_rank: int, rank: int, round_number: int, client_key: str,
                        seed: int) -> tuple[int, ...]:
        """r distinct sorted indices in [0, R), drawn by a Generator seeded from sha256 of (seed, round, client key)."""
        check_rank("rank", rank, maximum=global_rank)
        digest = hashlib.sha256(json.dumps([seed, round_number, client_key]).encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        return tuple(sorted(int(j) for j in rng.choice(global_rank, size=rank, replace=False)))

    def min_upload_rank(self, rank: int) -> int:
        """Exactly the planned components come back."""
        return rank

    def component_indices(self, result: ClientResult, upload_rank: int, global_rank: int) -> tuple[int, ...]:
        """The client's `indices`: r_k distinct integers in [0, R)."""
        who = f"plora upload from {result.adapter.meta.get('client_id', 'a client')}"
        indices = result.indices
        if indices is None:
            raise ValueError(f"{who} has no indices; plora needs the global indices its components train")
        if len(indices) != upload_rank:
            raise ValueError(f"{who} has rank {upload_rank} but {len(indices)} indices; they must match")
        if any(isinstance(j, bool) or not isinstance(j, (int, np.integer)) or not 0 <= j < global_rank for j in indices):
            raise ValueError(f"{who}: indices {list(indices)} must be integers in 0..{global_rank - 1}")
        if len(set(indices)) != len(indices):
            raise ValueError(f"{who}: indices {list(indices)} contain duplicates")
        return tuple(int(j) for j in indices)

    def aggregate_module(self, previous, parts: list[Part], n: np.ndarray):
        shares = n / n.sum()
        weights = [np.full(len(idx), share) for (_, _, idx), share in zip(parts, shares)]
        return mix_component_updates(parts, weights, previous)

