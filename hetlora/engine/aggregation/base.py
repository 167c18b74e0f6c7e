"""What every rule shares: the round-0 global, truncation, input checks, dense means.

A rule subclasses `BaseRule` and implements `aggregate_module`; `aggregate` validates the
inputs, runs it per module in float64 and returns float32.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from typing import ClassVar

import numpy as np

from hetlora.protocol.spec import AdapterSpec
from hetlora.protocol.plan import ClientPlan, Tier
from hetlora.protocol.settings import TrainingSettings
from hetlora.protocol.wire import Adapter
from hetlora.engine.aggregation.contract import ClientResult
from hetlora.engine.aggregation.mixing import Part

DENSE_INIT_STD = 0.02


class BaseRule:
    """Defaults: distribution by top-r truncation, plans without indices, uploads up to the planned rank."""

    name: ClassVar[str]
    mode: ClassVar[str] = "plain"  # the local training mode of a LoRA round (hetlora.protocol.plan.MODES)

    def init_global(self, spec: AdapterSpec, global_rank: int, seed: int) -> Adapter:
        """Deterministic from `seed`: A ~ U(-1/sqrt(in), 1/sqrt(in)) (R x in), B = 0 (out x R), so dW = 0.

        Dense tensors: weights (2-D and up) ~ N(0, 0.02^2), biases (1-D) = 0. Modules and
        dense tensors draw in sorted name order.
        """
        check_rank("global_rank", global_rank, maximum=None)
        rng = np.random.default_rng(seed)
        lora = {}
        for name in sorted(spec.modules):
            m = spec.modules[name]
            bound = 1.0 / np.sqrt(m.in_features)
            a = rng.uniform(-bound, bound, size=(global_rank, m.in_features))
            lora[name] = (a.astype(np.float32), np.zeros((m.out_features, global_rank), dtype=np.float32))
        dense = {}
        for name in sorted(spec.dense):
            shape = spec.dense[name]
            values = rng.normal(0.0, DENSE_INIT_STD, size=shape) if len(shape) >= 2 else np.zeros(shape)
            dense[name] = values.astype(np.float32)
        return Adapter(lora=lora, dense=dense, meta={"rule": self.name, "rank": global_rank})

    def client_view(self, global_: Adapter, rank: int) -> Adapter:
        """Top-r truncation: B[:, :r], A[:r] (copies); dense tensors copied."""
        check_rank("rank", rank, maximum=rank_of(global_))
        lora = {name: (a[:rank].copy(), b[:, :rank].copy()) for name, (a, b) in global_.lora.items()}
        return Adapter(lora=lora, dense=_copy_dense(global_), meta={**global_.meta, "rank": rank})

    def upload_start(self, global_: Adapter, rank: int, indices) -> Adapter:
        """What a client planned at `rank` (and plora `indices`) started its training from, its components in the
        order of its upload: the client view (hetlora.engine.aggregation.bounds measures updates from it)."""
        return self.client_view(global_, rank)

    def configure(self, *, round_number: int, client_key: str, tier: Tier, global_rank: int, seed: int,
                  training: TrainingSettings, stage: str = "lora", class_counts=None) -> ClientPlan:
        """One client's plan for a round: `planned_rank` of its tier, this rule's `mode` and `planned_indices`,
        the run's training settings within the tier's caps and seeded by `training_seed(seed, round, client_key)`.
        The head stages (hetlora.protocol.plan.stage_of) collect statistics (round 0) or fit the head with the
        run's pooled `class_counts` (head rounds) instead of training LoRA."""
        rank = self.planned_rank(tier.rank, global_rank)
        check_rank("rank", rank, maximum=global_rank)
        settings = replace(training.capped(tier.batch_size, tier.seq_len, tier.activation_checkpointing),
                           seed=training_seed(seed, round_number, client_key))
        if stage == "head-statistics":
            return ClientPlan(round=round_number, rank=rank, mode=stage, training=settings)
        if stage == "head-fit":
            counts = tuple(int(c) for c in class_counts) if class_counts is not None else None
            return ClientPlan(round=round_number, rank=rank, mode=stage, training=settings, class_counts=counts)
        indices = self.planned_indices(global_rank=global_rank, rank=rank, round_number=round_number,
                                       client_key=client_key, seed=seed)
        return ClientPlan(round=round_number, rank=rank, mode=self.mode, training=settings, indices=indices,
                          min_upload_rank=self.min_upload_rank(rank))

    def planned_rank(self, tier_rank: int, global_rank: int) -> int:
        """The rank a client of this tier rank trains at: the tier's."""
        return tier_rank

    def planned_indices(self, *, global_rank: int, rank: int, round_number: int, client_key: str,
                        seed: int) -> tuple[int, ...] | None:
        """The global components a client trains: none named (top-r truncation)."""
        return None

    def min_upload_rank(self, rank: int) -> int:
        """The lowest effective rank an upload of a rank-r plan may have: 1 (self-pruning may lower it)."""
        return 1

    def aggregate(self, global_: Adapter, results: list[ClientResult]) -> Adapter:
        """Validate, then per module `aggregate_module` in float64; dense: sum (n_k/n) D_k. Returns float32."""
        rank = rank_of(global_)
        ranks = check_results(global_, results)
        index_sets = [self.component_indices(res, r_k, rank) for res, r_k in zip(results, ranks)]
        n = np.array([res.n_samples for res in results], dtype=np.float64)
        lora = {}
        for name, (prev_a, prev_b) in global_.lora.items():
            previous = (np.asarray(prev_a, dtype=np.float64), np.asarray(prev_b, dtype=np.float64))
            parts = [
                (np.asarray(res.adapter.lora[name][0], dtype=np.float64),
                 np.asarray(res.adapter.lora[name][1], dtype=np.float64), idx)
                for res, idx in zip(results, index_sets)
            ]
            a, b = self.aggregate_module(previous, parts, n)
            lora[name] = (a.astype(np.float32), b.astype(np.float32))
        dense = {name: weighted_mean([res.adapter.dense[name] for res in results], n) for name in global_.dense}
        return Adapter(lora=lora, dense=dense, meta={"rule": self.name, "rank": rank})

    def component_indices(self, result: ClientResult, upload_rank: int, global_rank: int) -> tuple[int, ...]:
        """The global components a client's r_k components are: 0..r_k-1 (zero padding)."""
        return tuple(range(upload_rank))

    def aggregate_module(
        self, previous: tuple[np.ndarray, np.ndarray], parts: list[Part], n: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The new (A, B) of one module at rank R from the previous global and the client parts."""
        raise NotImplementedError


def training_seed(seed: int, round_number: int, key: str) -> int:
    """The seed of one client's local round: sha256 of (run seed, round, client key), 32 bits."""
    digest = hashlib.sha256(json.dumps([seed, round_number, key]).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def rank_of(global_: Adapter) -> int:
    """The common rank R of the global's modules (ValueError when they differ)."""
    ranks = {a.shape[0] for a, _ in global_.lora.values()}
    if len(ranks) != 1:
        raise ValueError(f"the global adapter must have one rank across its modules, found {sorted(ranks)}")
    return ranks.pop()


def check_results(global_: Adapter, results: list[ClientResult]) -> list[int]:
    """Check every result against the global; return each client's upload rank r_k (1 <= r_k <= R)."""
    if not results:
        raise ValueError("no client results to aggregate; a round needs at least one upload")
    rank = rank_of(global_)
    ranks = []
    for k, res in enumerate(results):
        who = f"client result {k} ({res.adapter.meta.get('client_id', 'unknown id')})"
        if isinstance(res.n_samples, bool) or not isinstance(res.n_samples, (int, np.integer)) or res.n_samples <= 0:
            raise ValueError(f"{who}: n_samples must be a positive integer, got {res.n_samples!r}")
        if res.adapter.lora.keys() != global_.lora.keys():
            odd = sorted(res.adapter.lora.keys() ^ global_.lora.keys())
            raise ValueError(f"{who}: LoRA modules do not match the global ({len(odd)} differ, e.g. {odd[0]!r})")
        if res.adapter.dense.keys() != global_.dense.keys():
            odd = sorted(res.adapter.dense.keys() ^ global_.dense.keys())
            raise ValueError(f"{who}: dense tensors do not match the global ({len(odd)} differ, e.g. {odd[0]!r})")
        ranks.append(_check_factors(who, res.adapter, global_, rank))
        for name, t in res.adapter.dense.items():
            if t.shape != global_.dense[name].shape:
                raise ValueError(f"{who}: dense {name!r} has shape {t.shape}, expected {global_.dense[name].shape}")
            if not np.isfinite(t).all():
                raise ValueError(f"{who}: dense {name!r} contains NaN or Inf")
    return ranks


def _check_factors(who: str, adapter: Adapter, global_: Adapter, rank: int) -> int:
    upload_ranks = set()
    for name, (a, b) in adapter.lora.items():
        ga, gb = global_.lora[name]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != ga.shape[1] or b.shape[0] != gb.shape[0] or a.shape[0] != b.shape[1]:
            raise ValueError(f"{who}: {name} has A {a.shape} / B {b.shape}, expected (r, {ga.shape[1]}) / ({gb.shape[0]}, r)")
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise ValueError(f"{who}: {name} contains NaN or Inf")
        upload_ranks.add(a.shape[0])
    if len(upload_ranks) != 1:
        raise ValueError(f"{who}: modules have different ranks {sorted(upload_ranks)}; all must share one rank")
    r_k = upload_ranks.pop()
    if not 1 <= r_k <= rank:
        raise ValueError(f"{who}: rank {r_k} is outside 1..{rank} (the global rank)")
    return r_k


def check_rank(label: str, rank: int, maximum: int | None) -> None:
    """ValueError unless `rank` is an integer in 1..maximum (no upper bound when maximum is None)."""
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"{label} must be a positive integer, got {rank!r}")
    if maximum is not None and rank > maximum:
        raise ValueError(f"{label} {rank} exceeds the global rank {maximum}")


def weighted_mean(tensors: list[np.ndarray], n: np.ndarray) -> np.ndarray:
    """sum_k (n_k / n) T_k in float64, returned as float32."""
    w = n / n.sum()
    total = sum(w_k * np.asarray(t, dtype=np.float64) for w_k, t in zip(w, tensors))
    return np.asarray(total, dtype=np.float32)


def _copy_dense(adapter: Adapter) -> dict[str, np.ndarray]:
    return {name: t.copy() for name, t in adapter.dense.items()}

