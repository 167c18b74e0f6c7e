"""Linear algebra on LoRA factors that never forms the dense out x in product B @ A."""

from __future__ import annotations

import numpy as np


def update_norm(a: np.ndarray, b: np.ndarray) -> float:
    """||B A||_F from the factors: ||B A||_F^2 = trace((B^T B)(A A^T)), two r x r Gram matrices.

    Both Gram matrices are symmetric, so the trace of their product is the sum of their
    elementwise product. Cost O(r^2 (out + in)) instead of O(r out in).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    squared = float(np.sum((b.T @ b) * (a @ a.T)))
    return float(np.sqrt(max(squared, 0.0)))


def truncated_svd_of_product(b: np.ndarray, a: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top `rank` singular triplets (U, S, V^T) of B @ A, B (out x m), A (m x in).

    B = Q_b R_b and A^T = Q_a R_a (reduced QR), so B A = Q_b (R_b R_a^T) Q_a^T; the small
    core R_b R_a^T = U' S V'^T gives U = Q_b U', V = Q_a V'. Only the kept columns of U and
    V are formed. Returns at most min(rank, out, in, m) triplets, singular values descending;
    a zero product gives zero singular values, never NaN.
    """
    q_b, r_b = np.linalg.qr(np.asarray(b, dtype=np.float64))
    q_a, r_a = np.linalg.qr(np.asarray(a, dtype=np.float64).T)
    u_core, s, vt_core = np.linalg.svd(r_b @ r_a.T, full_matrices=False)
    keep = min(rank, s.shape[0])
    return q_b @ u_core[:, :keep], s[:keep], vt_core[:keep] @ q_a.T
