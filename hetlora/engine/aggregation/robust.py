"""Robust aggregation as an option that composes with every rule (`--robust`; pure numpy, no I/O).

It works on the clients' updates (their change from their start, hetlora.engine.aggregation.bounds) before the
rule aggregates, so the rule and the server optimiser run unchanged after it:

  none          bounded influence only (bounds.bound_influence: anchored, relative to the round's median)
  norm-bound    plus an absolute bound: every update quantity at most NORM_BOUND_FACTOR x its anchor, the lower
                median of the first round that measured it (the norm bound of Sun et al. 2019, "Can you really
                backdoor federated learning?"), whatever later rounds' medians say
  median        each client's update replaced by the coordinate-wise median of the updates covering the same
                global coordinates (Flower's FedMedian: np.median over clients, unweighted)
  trimmed-mean  the same with the coordinate-wise trimmed mean: of the K values, the int(beta K) smallest and
                largest dropped, the rest averaged (Flower's FedTrimmedAvg and scipy.stats.trim_mean, beta 0.2)

Coordinates: component j of a module is covered by the clients whose upload has it (`index_sets[k]`, the rule's
`component_indices`: 0..r_k-1 under truncation, plora's indices); every client covers the dense tensors.
With every client's update the same consensus mu, fedavg's global is the previous global + mu, exactly
FedMedian / FedTrimmedAvg; hetlora still pads lower ranks with zeros and hlora still takes the SVD of the
(now agreeing) products. Krum (Blanchard et al. 2017) picks one client's whole update; it is not offered
because clients of different ranks cover different coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hetlora.protocol.wire import Adapter
from hetlora.engine.aggregation.bounds import CLIP_FACTOR, bound_influence
from hetlora.engine.aggregation.contract import ClientResult

ROBUST = ("none", "trimmed-mean", "median", "norm-bound")
NORM_BOUND_FACTOR = 2.0
DEFAULT_TRIM_BETA = 0.2


@dataclass(frozen=True)
class Defence:
    """What bounds the clients' influence: the clip factor of the anchored bound and the robust option."""

    robust: str = "none"
    trim_beta: float = DEFAULT_TRIM_BETA
    clip_factor: float = CLIP_FACTOR

    def __post_init__(self):
        if self.robust not in ROBUST:
            raise ValueError(f"unknown robust option {self.robust!r}; choose one of {', '.join(ROBUST)}")
        if not 0.0 <= self.trim_beta < 0.5 or not self.clip_factor > 1.0:
            raise ValueError("--trim-beta must be in [0, 0.5) and the clip factor above 1")

    def apply(self, starts: list[Adapter], results: list[ClientResult], index_sets: list[tuple[int, ...]],
              anchors: dict) -> tuple[list[ClientResult], dict[int, list[str]], dict]:
        """(the results the rule aggregates, what was clipped per client index, the anchors after the round)."""
        absolute = NORM_BOUND_FACTOR if self.robust == "norm-bound" else None
        bounded, clipped, anchors = bound_influence(starts, results, anchors, factor=self.clip_factor,
                                                    absolute_factor=absolute)
        if self.robust in ("median", "trimmed-mean"):
            bounded = consensus(starts, bounded, index_sets, self.location)
        return bounded, clipped, anchors

    def location(self, values: np.ndarray) -> np.ndarray:
        """The robust location over axis 0 (the clients) of `values` (K x ...)."""
        if self.robust == "median":
            return np.median(values, axis=0)
        cut = int(self.trim_beta * values.shape[0])
        return np.sort(values, axis=0)[cut: values.shape[0] - cut].mean(axis=0)


def consensus(starts: list[Adapter], results: list[ClientResult], index_sets: list[tuple[int, ...]],
              location) -> list[ClientResult]:
    """Every client's update replaced, coordinate by coordinate, by `location` of the updates covering it."""
    loras = [{} for _ in results]
    for name in starts[0].lora if starts else ():
        deltas_a = [np.asarray(r.adapter.lora[name][0], np.float64) - np.asarray(s.lora[name][0][: len(i)], np.float64)
                    for r, s, i in zip(results, starts, index_sets)]
        deltas_b = [np.asarray(r.adapter.lora[name][1], np.float64) - np.asarray(s.lora[name][1][:, : len(i)], np.float64)
                    for r, s, i in zip(results, starts, index_sets)]
        mu_a = _per_component([d for d in deltas_a], index_sets, location)
        mu_b = _per_component([d.T for d in deltas_b], index_sets, location)
        for k, (start, idx) in enumerate(zip(starts, index_sets)):
            a0, b0 = start.lora[name]
            rows = [mu_a[j] for j in idx]
            cols = [mu_b[j] for j in idx]
            loras[k][name] = ((np.asarray(a0[: len(idx)], np.float64) + np.array(rows)).astype(np.float32),
                              (np.asarray(b0[:, : len(idx)], np.float64) + np.array(cols).T).astype(np.float32))
    dense = {}
    for name in starts[0].dense if starts else ():
        prev = np.asarray(starts[0].dense[name], np.float64)
        mu = location(np.stack([np.asarray(r.adapter.dense[name], np.float64) - prev for r in results]))
        dense[name] = (prev + mu).astype(np.float32)
    return [ClientResult(adapter=Adapter(lora=loras[k], dense=dict(dense), meta=res.adapter.meta),
                         n_samples=res.n_samples, indices=res.indices) for k, res in enumerate(results)]


def _per_component(rows: list[np.ndarray], index_sets: list[tuple[int, ...]], location) -> dict[int, np.ndarray]:
    """Global component j -> `location` of the rows (row i of client k is component index_sets[k][i]) covering j."""
    covering: dict[int, list[np.ndarray]] = {}
    for k_rows, idx in zip(rows, index_sets):
        for i, j in enumerate(idx):
            covering.setdefault(j, []).append(k_rows[i])
    return {j: location(np.stack(vals)) for j, vals in covering.items()}
