"""Weighted means of rank components: the shared kernel of fedavg, hetlora and plora.

A module's global factors hold R rank components: component j is the pair (B[:, j], A[j, :]).
A client part (A_k, B_k, idx_k) carries r_k components; its component i is global component
idx_k[i] (hetlora/fedavg: idx_k = 0..r_k-1, zero padding; plora: the indices it was assigned).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Part = tuple[np.ndarray, np.ndarray, tuple[int, ...]]  # (A_k r_k x in, B_k out x r_k, idx_k)


def shares(scores: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """p_k = scores_k / sum_j scores_j; when every score is 0, p_k = fallback_k / sum_j fallback_j."""
    scores = np.asarray(scores, dtype=np.float64)
    total = scores.sum()
    if total > 0:
        return scores / total
    fallback = np.asarray(fallback, dtype=np.float64)
    return fallback / fallback.sum()


def per_component_shares(
    index_sets: Sequence[tuple[int, ...]], scores: np.ndarray, fallback: np.ndarray, rank: int
) -> list[np.ndarray]:
    """Weights normalised within each global component j over the clients covering it.

    w_kj = shares(scores, fallback) restricted to C_j = {k : j in idx_k}; returned per client,
    aligned with its own components (w[k][i] is the weight of global component idx_k[i]).
    """
    weights = [np.zeros(len(idx)) for idx in index_sets]
    positions = [{j: i for i, j in enumerate(idx)} for idx in index_sets]
    for j in range(rank):
        covering = [k for k, pos in enumerate(positions) if j in pos]
        if not covering:
            continue
        w = shares(scores[covering], fallback[covering])
        for k, w_k in zip(covering, w):
            weights[k][positions[k][j]] = w_k
    return weights


def mix_components(
    parts: Sequence[Part], weights: Sequence[np.ndarray], previous: tuple[np.ndarray, np.ndarray], *, keep_uncovered: bool
) -> tuple[np.ndarray, np.ndarray]:
    """B[:, j] = sum_k w_kj B_k[:, i], A[j, :] = sum_k w_kj A_k[i, :] over parts with idx_k[i] = j.

    Components no part covers keep the previous global's value (`keep_uncovered`) or become 0.
    `previous` is (A, B) at rank R; the result is a new float64 (A, B) at rank R.
    """
    prev_a, prev_b = previous
    a = np.zeros(prev_a.shape, dtype=np.float64)
    b = np.zeros(prev_b.shape, dtype=np.float64)
    covered = np.zeros(prev_a.shape[0], dtype=bool)
    for (a_k, b_k, idx), w in zip(parts, weights):
        idx = np.asarray(idx, dtype=np.intp)
        a[idx] += w[:, None] * a_k
        b[:, idx] += b_k * w[None, :]
        covered[idx] = True
    if keep_uncovered:
        a[~covered] = prev_a[~covered]
        b[:, ~covered] = prev_b[:, ~covered]
    return a, b


def mix_component_updates(
    parts: Sequence[Part], weights: Sequence[np.ndarray], previous: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """B[:, j] = B_prev[:, j] + sum_k w_kj (B_k[:, i] - B_prev[:, j]) over parts with idx_k[i] = j (same for A).

    Each client moves the components it trained by its weighted change; a client that did not train j adds
    a zero change, so with w_kj = n_k / n over the whole round the total change is a mean, not a sum, of the
    clients' changes. Components no part covers keep their value. Returns a new float64 (A, B) at rank R.
    """
    prev_a, prev_b = previous
    a = np.array(prev_a, dtype=np.float64)
    b = np.array(prev_b, dtype=np.float64)
    for (a_k, b_k, idx), w in zip(parts, weights):
        idx = np.asarray(idx, dtype=np.intp)
        a[idx] += w[:, None] * (a_k - prev_a[idx])
        b[:, idx] += (b_k - prev_b[:, idx]) * w[None, :]
    return a, b
