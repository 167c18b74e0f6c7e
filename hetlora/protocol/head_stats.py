"""Per-class feature statistics of one client: the upload of the head-initialisation round (round 0).

For the frozen base model's pooled features f_i (what the classification head reads) of the
client's n examples with labels y_i:
  class_sums    (C, d)  S_c = sum_{i: y_i = c} f_i
  class_counts  (C,)    n_c = |{i: y_i = c}|
  feature_gram  (d, d)  G = sum_i f_i f_i^T
The server pools them over clients (sums are exact) and sets the head in closed form
(hetlora.engine.aggregation.head_init). What they reveal: each class's mean feature and the
second moment of the client's features, not any single example (unless a class has one example).

Wire: safetensors, float64 tensors of those names, metadata `format` = "hetlora-head-statistics",
`format_version` = "1", `meta` = JSON {round, client_id, n_samples, energy (optional: hetlora.protocol.energy)}.
Pure numpy, no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from hetlora.protocol.wire import EXTRA_TENSORS, WireFormatError, header_bytes, meta_int, parse_meta, read_header

FORMAT = "hetlora-head-statistics"
FORMAT_VERSION = 1
TENSORS = ("class_sums", "class_counts", "feature_gram")
# Float slack of the consistency checks (sums of float32 features accumulated in float64), and of the
# positive semi-definiteness checks relative to trace(G) (float64 rounding of sums of outer products).
TOLERANCE = 1e-3
PSD_TOLERANCE = 1e-8
# How long a pooled feature may be on average when the pooling gives no bound of its own (`mean`: 1).
FEATURE_NORM_LIMIT = 1e4


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


def statistics_bytes(num_labels: int, dim: int) -> int:
    """The size of a valid statistics upload for C classes and d features (float64), with the longest header."""
    return 8 + header_bytes(len(TENSORS) + EXTRA_TENSORS) + 8 * (num_labels * dim + num_labels + dim * dim)


def encode_statistics(stats: HeadStatistics) -> bytes:
    tensors = {name: np.ascontiguousarray(getattr(stats, name), dtype=np.float64) for name in TENSORS}
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "meta": json.dumps(stats.meta, sort_keys=True)}
    return st_save(tensors, metadata=metadata)


def decode_statistics(data: bytes, *, num_labels: int, dim: int, max_feature_norm: float | None = None,
                      max_samples: int | None = None) -> HeadStatistics:
    """Parse and check an upload (WireFormatError naming the first problem): the header within its limits before
    parsing, names, shapes, float64, finite values, and statistics that some set of features could have:
      counts   non-negative integers adding up to meta n_samples, at most `max_samples` (the client's declared
               sample count and the server's data cap)
      G        symmetric positive semi-definite, trace(G) = sum_i ||f_i||^2 <= n * max_feature_norm^2
      S_c      ||S_c|| <= n_c * max_feature_norm, 0 for an empty class, and the within-class scatter
               G - sum_c S_c S_c^T / n_c positive semi-definite (so no class mean is longer than the features allow)
    (`max_feature_norm` None: FEATURE_NORM_LIMIT). Every value is then bounded by n * max_feature_norm^2, so the pooled sums of any number of clients
    (up to 2^31 - 1) stay finite in float64."""
    header = read_header(data, max_tensors=len(TENSORS))
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise WireFormatError("bad_metadata", f"header metadata 'format' must be {FORMAT!r} in round 0 (head statistics)")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise WireFormatError("bad_version", f"head statistics format_version must be {FORMAT_VERSION}")
    meta = parse_meta(metadata)
    expected = {"class_sums": (num_labels, dim), "class_counts": (num_labels,), "feature_gram": (dim, dim)}
    names = {k for k in header if k != "__metadata__"}
    if names != set(TENSORS):
        raise WireFormatError("bad_statistics", f"head statistics need exactly the tensors {list(TENSORS)}, "
                              f"got {sorted(names)[:5]}")
    for name, shape in expected.items():
        info = header[name]
        if not isinstance(info, dict) or info.get("dtype") != "F64" or info.get("shape") != list(shape):
            raise WireFormatError("bad_shape", f"{name} must be float64 of shape {list(shape)}")
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError) as exc:
        raise WireFormatError("not_safetensors", f"body is not a valid safetensors file: {exc}") from None
    stats = HeadStatistics(tensors["class_sums"], tensors["class_counts"], tensors["feature_gram"], meta)
    n_samples = meta_int(meta, "n_samples", minimum=1)
    if max_samples is not None and n_samples > max_samples:
        raise WireFormatError("bad_statistics", f"n_samples {n_samples} is more than this client may have "
                              f"({max_samples}: its declared sample count, within the server's data cap)")
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow to inf is refused, not warned about
        check_consistency(stats, n_samples, FEATURE_NORM_LIMIT if max_feature_norm is None else max_feature_norm)
    return stats


def check_consistency(stats: HeadStatistics, n_samples: int, max_norm: float) -> None:
    """The checks of `decode_statistics` on decoded values (WireFormatError `not_finite` / `bad_statistics`)."""
    for name in TENSORS:
        if not np.isfinite(getattr(stats, name)).all():
            raise WireFormatError("not_finite", f"{name} contains NaN or Inf; the statistics were not stored")
    counts, sums, gram = stats.class_counts, stats.class_sums, stats.feature_gram
    if (counts < 0).any() or (counts != np.round(counts)).any() or counts.sum() != n_samples:
        raise WireFormatError("bad_statistics", f"class_counts must be non-negative integers adding up to "
                              f"n_samples = {n_samples}")
    trace = float(np.trace(gram))
    if not trace <= n_samples * max_norm ** 2 * (1 + TOLERANCE):
        raise WireFormatError("bad_statistics", f"features are longer than the pooling allows: trace(feature_gram) = "
                              f"{trace:.3g} is more than {n_samples} features of length at most {max_norm:g} can have")
    scale = max(trace, 1e-12)
    if np.abs(gram - gram.T).max() > TOLERANCE * scale:
        raise WireFormatError("bad_statistics", "feature_gram must be symmetric")
    sum_norms = np.linalg.norm(sums, axis=1)
    if (sum_norms[counts == 0] > 0).any():
        raise WireFormatError("bad_statistics", "a class with count 0 has a nonzero feature sum")
    if (sum_norms > counts * max_norm * (1 + TOLERANCE)).any():
        raise WireFormatError("bad_statistics", f"features are longer than the pooling allows: a class sum is longer "
                              f"than its count of features of length at most {max_norm:g} can be")
    symmetric = (gram + gram.T) / 2
    if _min_eigenvalue(symmetric) < -PSD_TOLERANCE * scale:
        raise WireFormatError("bad_statistics", "feature_gram is not positive semi-definite")
    present = counts > 0
    between = (sums[present].T / counts[present]) @ sums[present]
    if _min_eigenvalue(symmetric - between) < -PSD_TOLERANCE * scale:
        raise WireFormatError("bad_statistics", "class sums are inconsistent with feature_gram (the within-class "
                              "scatter G - sum_c S_c S_c^T / n_c is not positive semi-definite)")


def _min_eigenvalue(matrix: np.ndarray) -> float:
    return float(np.linalg.eigvalsh(matrix)[0]) if matrix.size else 0.0
