"""HetLoRA (Cho et al., arXiv 2401.06432): zero padding with sparsity-weighted aggregation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hetlora.engine.aggregation.base import BaseRule
from hetlora.engine.aggregation.linalg import update_norm
from hetlora.engine.aggregation.mixing import Part, mix_components, per_component_shares, shares

WEIGHTINGS = ("sparsity", "sparsity_n", "n")


@dataclass(frozen=True)
class HetLoRARule(BaseRule):
    """Per module: zero-pad every B_k, A_k to rank R, then B = sum_k p_k B_k, A = sum_k p_k A_k.

    s_k = ||B_k A_k||_F from the factors (s_k^2 = trace((B_k^T B_k)(A_k A_k^T))), and
      weighting="sparsity"   (default)  p_k = s_k / sum_j s_j
      weighting="sparsity_n"            p_k = n_k s_k / sum_j n_j s_j
      weighting="n"                     p_k = n_k / n
    When every score is 0 (a first round in which no client moved B away from 0), p_k = n_k / n.

    Weakness of the default: a component j beyond most clients' ranks is averaged with the
    zeros of the padding, so high-rank components shrink every round, and those beyond every
    client's rank become 0.
    segment_average=True (raFLoRA, arXiv 2602.13486) averages component j only over the
    clients whose rank covers it, p_k renormalised within that set (same weighting, same
    fallback); components no client covered keep the previous global's value.
    Its weakness: a component only one or two clients cover enters the global at full weight every
    round, with nothing to shrink it; under label skew those clients' updates accumulate there (measured:
    components 17-32 ended 45-120x larger than under zero padding after 20 rounds; accuracy fell 1-2 points).
    Clients download the top-r truncation B[:, :r], A[:r].
    """

    weighting: str = "sparsity"
    segment_average: bool = False
    name = "hetlora"
    mode = "hetlora"

    def __post_init__(self):
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"hetlora weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if not isinstance(self.segment_average, bool):
            raise ValueError(f"hetlora segment_average must be true or false, got {self.segment_average!r}")

    def aggregate_module(self, previous, parts: list[Part], n: np.ndarray):
        scores = self.scores(parts, n)
        if self.segment_average:
            weights = per_component_shares([idx for _, _, idx in parts], scores, n, previous[0].shape[0])
        else:
            weights = [np.full(len(idx), p_k) for (_, _, idx), p_k in zip(parts, shares(scores, n))]
        return mix_components(parts, weights, previous, keep_uncovered=self.segment_average)

    def scores(self, parts: list[Part], n: np.ndarray) -> np.ndarray:
        """Unnormalised p_k: s_k, n_k s_k or n_k per the weighting."""
        if self.weighting == "n":
            return n.copy()
        s = np.array([update_norm(a, b) for a, b, _ in parts])
        return s if self.weighting == "sparsity" else n * s
