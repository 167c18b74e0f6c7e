"""Head statistics from raw features, computed directly with numpy (the reference the client's are checked against)."""

from __future__ import annotations

import numpy as np

from hetlora.protocol.head_stats import HeadStatistics

C, D = 4, 6  # classes, feature dimension


def raw_features(seed, n=40, num_labels=C, dim=D):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_labels, n)
    centers = rng.normal(0, 2, (num_labels, dim))
    return centers[labels] + rng.normal(0, 1, (n, dim)), labels


def statistics_of(features, labels, num_labels=C, meta=None):
    sums = np.zeros((num_labels, features.shape[1]))
    np.add.at(sums, labels, features)
    counts = np.bincount(labels, minlength=num_labels).astype(np.float64)
    return HeadStatistics(sums, counts, features.T @ features, meta or {"round": 0, "client_id": "c", "n_samples": len(labels)})
