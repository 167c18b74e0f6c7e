"""Closed-form classification heads from pooled per-class feature statistics (round 0).

With the statistics summed over clients (exact: S_c, n_c, G; see hetlora.protocol.head_stats),
n = sum_c n_c and class means mu_c = S_c / n_c:

  ncm  nearest class mean (FedNCM, Legate et al., NeurIPS 2023):
         W_c = t * mu_c / ||mu_c||,  b_c = 0
  lda  linear discriminant with a shrunk shared covariance (the closed form behind FedCOF,
       Goswami et al. 2025, here with the exact within-class scatter instead of an estimate):
         Sigma = (G - sum_c S_c S_c^T / n_c) / n
         Sigma_a = (1 - a) Sigma + a tr(Sigma)/d I
         W_c = t * Sigma_a^-1 mu_c,  b_c = t * (-1/2 mu_c^T Sigma_a^-1 mu_c + log(n_c / n))

t (the temperature) scales the logits: an LDA head is over-confident in high dimension, and
fine-tuning starts better from calibrated logits. Classes no client has get W_c = 0 and the
smallest bias of the others. Pure numpy; returns float32 (C, d) and (C,).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hetlora.protocol.head_stats import HeadStatistics

HEADS = ("ncm", "lda")
# Chosen on a validation split carved from BANKING77's training rows (all-MiniLM-L6-v2, mean pooling):
# the lda head's validation cross-entropy was lowest at t = 0.1 (3.44 at t = 1), accuracy best at a = 0.01.
DEFAULT_SHRINKAGE = 0.01
DEFAULT_TEMPERATURE = 0.1
# An lda head whose logits on the class means exceed this is ill-conditioned (features with almost no
# within-class spread, e.g. a random-weight model); all-MiniLM-L6-v2 on BANKING77 gives 32.
LOGIT_LIMIT = 1e3


def pool(statistics: Sequence[HeadStatistics]) -> HeadStatistics:
    """The exact statistics of the union of the clients' data: element-wise sums."""
    if not statistics:
        raise ValueError("no head statistics to pool; round 0 needs at least one upload")
    total = statistics[0]
    for s in statistics[1:]:
        total = total + s
    if not all(np.isfinite(t).all() for t in (total.class_sums, total.class_counts, total.feature_gram)):
        raise ValueError("the pooled head statistics are not finite in float64")  # the upload checks prevent it
    return total


def class_head(stats: HeadStatistics, method: str, *, shrinkage: float, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of the head `method` (ncm | lda) from pooled statistics; see the module docstring."""
    if method not in HEADS:
        raise ValueError(f"unknown head initialisation {method!r}; choose one of {', '.join(HEADS)}")
    if not 0.0 <= shrinkage <= 1.0 or temperature <= 0:
        raise ValueError("shrinkage must be in [0, 1] and temperature positive")
    counts = np.asarray(stats.class_counts, dtype=np.float64)
    present = counts > 0
    if not present.any():
        raise ValueError("the head statistics hold no examples")
    sums = np.asarray(stats.class_sums, dtype=np.float64)
    means = np.zeros_like(sums)
    means[present] = sums[present] / counts[present, None]
    if method == "ncm":
        norms = np.linalg.norm(means, axis=1, keepdims=True)
        weight = np.divide(means, norms, out=np.zeros_like(means), where=norms > 0)
        bias = np.zeros(len(counts))
    else:
        weight, bias = _lda(sums, counts, means, np.asarray(stats.feature_gram, dtype=np.float64), shrinkage)
    bias[~present] = bias[present].min()
    return (temperature * weight).astype(np.float32), (temperature * bias).astype(np.float32)


def safe_class_head(stats: HeadStatistics, method: str, *, shrinkage: float,
                    temperature: float) -> tuple[np.ndarray, np.ndarray, str]:
    """`class_head`, except that an ill-conditioned lda head (max |W mu_c + b| > LOGIT_LIMIT) is replaced by
    the ncm head. Returns (W, b, the method used)."""
    weight, bias = class_head(stats, method, shrinkage=shrinkage, temperature=temperature)
    counts = np.asarray(stats.class_counts, dtype=np.float64)
    present = counts > 0
    means = np.asarray(stats.class_sums, dtype=np.float64)[present] / counts[present, None]
    if method == "lda" and not np.abs(means @ weight.T.astype(np.float64) + bias).max() <= LOGIT_LIMIT:
        weight, bias = class_head(stats, "ncm", shrinkage=shrinkage, temperature=temperature)
        return weight, bias, "ncm"
    return weight, bias, method


def _lda(sums, counts, means, gram, shrinkage):
    n = counts.sum()
    present = counts > 0
    dim = gram.shape[0]
    between = (sums[present].T / counts[present]) @ sums[present]
    within = (gram - between) / n
    within = (1.0 - shrinkage) * within + shrinkage * np.trace(within) / dim * np.eye(dim)
    # A small ridge keeps the solve defined when there is less data than dimensions and no shrinkage.
    within += 1e-9 * max(np.trace(within) / dim, 1e-12) * np.eye(dim)
    weight = np.linalg.solve(within, means.T).T
    bias = -0.5 * np.sum(weight * means, axis=1)
    bias[present] += np.log(counts[present] / n)
    weight[~present] = 0.0
    return weight, bias
