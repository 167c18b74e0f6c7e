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
    """The top `rank` nonzero singular triplets (U, S, V^T) of B @ A, B (out x m), A (m x in).

    With B = Q_b R_b and A^T = Q_a R_a (Q with orthonormal columns, see `_small_factor`),
    B A = Q_b (R_b R_a^T) Q_a^T, so the core R_b R_a^T (min(out, m) x min(in, m)) = U' S V'^T
    has the singular values of B A and U = Q_b U', V = Q_a V'. The core is small when m is;
    once m >= out and m >= in it is as large as B A itself, and no factored form does better. Q_b and Q_a are never formed: since A Q_a = R_a^T and Q_b^T B = R_b,
        U = B (R_a^T V') S^-1,   V^T = S^-1 (U'^T R_b) A,
    which costs O((out + in) m rank) instead of O((out + in) m^2).
    Singular values at or below the rounding error of the product,
    max(out, in, m) * eps * ||B||_F ||A||_F, count as 0 and are dropped, so at most
    min(rank, out, in, m) triplets come back (none for a zero product), singular values descending.
    """
    b = np.asarray(b, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    r_b = _small_factor(b)
    r_a = _small_factor(a.T)
    u_core, s, vt_core = np.linalg.svd(r_b @ r_a.T, full_matrices=False)
    tolerance = max(*b.shape, a.shape[1]) * np.finfo(np.float64).eps * np.linalg.norm(b) * np.linalg.norm(a)
    keep = int(np.count_nonzero(s[:rank] > tolerance))
    s = s[:keep]
    u = (b @ (r_a.T @ vt_core[:keep].T)) / s[None, :]
    vt = ((u_core[:, :keep].T @ r_b) @ a) / s[:, None]
    return u, s, vt


def _small_factor(x: np.ndarray) -> np.ndarray:
    """R with x = Q R, Q orthonormal columns, R at most min(rows, cols) rows.

    A tall x (rows > cols) gives the triangular factor of its QR. Otherwise x is its own factor
    (Q = I): its rows are already at most its columns, and a QR would not make the core smaller.
    """
    return np.linalg.qr(x, mode="r") if x.shape[0] > x.shape[1] else x
