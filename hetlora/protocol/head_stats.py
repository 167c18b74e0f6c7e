"""Per-class feature statistics of one client: the upload of the head-initialisation round (round 0).

For the frozen base model's pooled features f_i (what the classification head reads) of the
client's n examples with labels y_i:
  class_sums    (C, d)  S_c = sum_{i: y_i = c} f_i
  class_counts  (C,)    n_c = |{i: y_i = c}|
  feature_gram  (d, d)  G = sum_i f_i f_i^T
The server pools them over clients (sums are exact) and sets the head in closed form
(server_stub.aggregation.head_init). What they reveal: each class's mean feature and the
second moment of the client's features, not any single example (unless a class has one example).

Wire: safetensors, float64 tensors of those names, metadata `format` = "hetlora-head-statistics",
`format_version` = "1", `meta` = JSON {round, client_id, n_samples}. Pure numpy, no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from hetlora.protocol.wire import WireFormatError, meta_int, read_header

FORMAT = "hetlora-head-statistics"
FORMAT_VERSION = 1
TENSORS = ("class_sums", "class_counts", "feature_gram")
# Float slack of the consistency checks (sums of float32 features accumulated in float64).
TOLERANCE = 1e-3


@dataclass
class HeadStatistics:
    class_sums: np.ndarray
    class_counts: np.ndarray
    feature_gram: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return int(self.class_counts.sum())

    def __add__(self, other: "HeadStatistics") -> "HeadStatistics":
        return HeadStatistics(self.class_sums + other.class_sums, self.class_counts + other.class_counts,
                              self.feature_gram + other.feature_gram)


def class_statistics(features: np.ndarray, labels: np.ndarray, num_labels: int) -> HeadStatistics:
    """S_c, n_c and G of features (n, d) with integer labels (n,) in 0..num_labels-1, in float64."""
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    sums = np.zeros((num_labels, features.shape[1]))
    np.add.at(sums, labels, features)
    counts = np.bincount(labels, minlength=num_labels).astype(np.float64)
    return HeadStatistics(class_sums=sums, class_counts=counts, feature_gram=features.T @ features)


def encode_statistics(stats: HeadStatistics) -> bytes:
    tensors = {name: np.ascontiguousarray(getattr(stats, name), dtype=np.float64) for name in TENSORS}
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "meta": json.dumps(stats.meta, sort_keys=True)}
    return st_save(tensors, metadata=metadata)


def decode_statistics(data: bytes, *, num_labels: int, dim: int, max_feature_norm: float | None) -> HeadStatistics:
    """Parse and check an upload: names, shapes, float64, finite values, integer counts that add up to
    meta n_samples, a symmetric Gram matrix, and features no longer than `max_feature_norm` on average:
    ||S_c|| <= n_c * max_norm and trace(G) <= n * max_norm^2 (when a bound is given), and always
    sum_c ||S_c||^2 / n_c <= trace(G) (a class mean is never longer than the features' RMS)."""
    header = read_header(data)
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise WireFormatError("bad_metadata", f"header metadata 'format' must be {FORMAT!r} in round 0 (head statistics)")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise WireFormatError("bad_version", f"head statistics format_version must be {FORMAT_VERSION}")
    try:
        meta = json.loads(metadata.get("meta", "{}"))
    except (TypeError, json.JSONDecodeError):
        raise WireFormatError("bad_metadata", "header metadata 'meta' is not valid JSON") from None
    if not isinstance(meta, dict):
        raise WireFormatError("bad_metadata", "header metadata 'meta' must be a JSON object")
    expected = {"class_sums": (num_labels, dim), "class_counts": (num_labels,), "feature_gram": (dim, dim)}
    names = {k for k in header if k != "__metadata__"}
    if names != set(TENSORS):
        raise WireFormatError("bad_statistics", f"head statistics need exactly the tensors {list(TENSORS)}, "
                              f"got {sorted(names)}")
    for name, shape in expected.items():
        info = header[name]
        if not isinstance(info, dict) or info.get("dtype") != "F64" or info.get("shape") != list(shape):
            raise WireFormatError("bad_shape", f"{name} must be float64 of shape {list(shape)}")
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError) as exc:
        raise WireFormatError("not_safetensors", f"body is not a valid safetensors file: {exc}") from None
    stats = HeadStatistics(tensors["class_sums"], tensors["class_counts"], tensors["feature_gram"], meta)
    _check_values(stats, meta_int(meta, "n_samples", minimum=1), max_feature_norm)
    return stats


def _check_values(stats: HeadStatistics, n_samples: int, max_norm: float | None) -> None:
    for name in TENSORS:
        if not np.isfinite(getattr(stats, name)).all():
            raise WireFormatError("not_finite", f"{name} contains NaN or Inf; the statistics were not stored")
    counts = stats.class_counts
    if (counts < 0).any() or (counts != np.round(counts)).any() or counts.sum() != n_samples:
        raise WireFormatError("bad_statistics", f"class_counts must be non-negative integers adding up to "
                              f"n_samples = {n_samples}")
    gram = stats.feature_gram
    scale = max(float(np.abs(gram).max()), 1.0)
    if np.abs(gram - gram.T).max() > TOLERANCE * scale:
        raise WireFormatError("bad_statistics", "feature_gram must be symmetric")
    trace = float(np.trace(gram))
    sum_norms = np.linalg.norm(stats.class_sums, axis=1)
    if (sum_norms[counts == 0] > 0).any():
        raise WireFormatError("bad_statistics", "a class with count 0 has a nonzero feature sum")
    present = counts > 0
    if float(np.sum(sum_norms[present] ** 2 / counts[present])) > trace * (1 + TOLERANCE) + TOLERANCE:
        raise WireFormatError("bad_statistics", "class sums are inconsistent with feature_gram "
                              "(a class mean longer than the features' root mean square)")
    if max_norm is not None:
        if (sum_norms > counts * max_norm * (1 + TOLERANCE)).any() or trace > n_samples * max_norm ** 2 * (1 + TOLERANCE):
            raise WireFormatError("bad_statistics", f"features are longer than the pooling allows ({max_norm:g})")
