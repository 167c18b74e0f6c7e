"""HLoRA (Liu et al. 2025; FlexLoRA is the same idea): SVD of the reconstructed mean update."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hetlora.engine.aggregation.base import BaseRule
from hetlora.engine.aggregation.linalg import truncated_svd_of_product
from hetlora.engine.aggregation.mixing import Part


@dataclass(frozen=True)
class HLoRARule(BaseRule):
    """Per module: dW = sum_k (n_k/n) B_k A_k = U S V^T, keep the top R with the balanced split

        B = U_R S_R^(1/2),  A = S_R^(1/2) V_R^T   (R = the global rank, `init_global`'s global_rank).

    Factored, never the dense out x in matrix: dW = [sqrt(w_k) B_k]_k @ [sqrt(w_k) A_k]_k (the
    B's stacked side by side, the A's on top of each other), then QR of both stacks and an SVD
    of the (sum r_k)-sized core (see `linalg.truncated_svd_of_product`).
    Components whose singular value is 0 (at rounding level; e.g. a zero update, or fewer than
    R independent directions) get B_j = 0 and keep the previous global's A_j: dW is unchanged
    and the component stays trainable (a pair B_j = A_j = 0 would get no gradient).
    Clients download the top-r truncation, the best rank-r approximation of the global dW
    because singular values are ordered.
    """

    name = "hlora"

    def aggregate_module(self, previous, parts: list[Part], n: np.ndarray):
        prev_a, prev_b = previous
        rank = prev_a.shape[0]
        root_w = np.sqrt(n / n.sum())
        b_stack = np.hstack([r * b_k for (_, b_k, _), r in zip(parts, root_w)])
        a_stack = np.vstack([r * a_k for (a_k, _, _), r in zip(parts, root_w)])
        u, s, vt = truncated_svd_of_product(b_stack, a_stack, rank)
        live = s.size
        root_s = np.sqrt(s)
        a = prev_a.copy()
        b = np.zeros_like(prev_b)
        a[:live] = root_s[:, None] * vt
        b[:, :live] = u * root_s[None, :]
        return a, b
