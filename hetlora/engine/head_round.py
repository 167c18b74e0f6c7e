"""Round 0, the head-initialisation round: checks of a statistics upload and the initial global.

Enabled by `ServerConfig.head_init` (ncm | lda) for classification runs. Every client registered
when round 0 opens uploads its per-class feature statistics (hetlora.protocol.head_stats) instead of an
adapter; the server pools them and sets the head of global version 0 in closed form
(hetlora.engine.aggregation.head_init); the LoRA factors are the rule's usual initial ones.
"""

from __future__ import annotations

import logging

import statistics as stats_lib

from hetlora.protocol.energy import energy_of
from hetlora.protocol.head_stats import FEATURE_NORM_LIMIT, HeadStatistics, decode_statistics
from hetlora.protocol.spec import linear_head
from hetlora.protocol.wire import Adapter, WireFormatError, meta_int
from hetlora.engine.aggregation.head_init import DEFAULT_SHRINKAGE, DEFAULT_TEMPERATURE, LOGIT_LIMIT, pool, safe_class_head
from hetlora.engine.errors import Invalid

log = logging.getLogger("hetlora.server")
HEAD_ROUND = 0
# The longest a pooled feature can be, per pooling (`mean`: L2-normalised); others: FEATURE_NORM_LIMIT.
FEATURE_NORM_BOUND = {"mean": 1.0}
# No client weighs more than this many times the median client in the pooled statistics (`bound_weights`).
STATISTICS_WEIGHT_FACTOR = 2.0


def load_statistics(config, body: bytes, max_samples: int | None = None) -> HeadStatistics:
    """Statistics bytes decoded and checked against the run's head shapes, pooling and the client's sample
    count (WireFormatError)."""
    _, _, num_labels, dim = linear_head(config.spec)
    return decode_statistics(body, num_labels=num_labels, dim=dim, max_samples=max_samples,
                             max_feature_norm=FEATURE_NORM_BOUND.get(config.spec.pooling, FEATURE_NORM_LIMIT))


def check_statistics(config, client_id: str, body: bytes, declared_samples: int) -> HeadStatistics:
    """A round-0 upload decoded and checked (Invalid with the wire code otherwise): its counts within the
    client's declared sample count and the server's data cap (`max_client_samples`), meta round exactly 0, the
    energy report (if any) as in an adapter upload (`energy_of`)."""
    try:
        stats = load_statistics(config, body, min(declared_samples, config.max_client_samples))
        if meta_int(stats.meta, "round") != HEAD_ROUND:
            raise WireFormatError("bad_metadata", f"head statistics must say round {HEAD_ROUND}")
        energy_of(stats.meta)
    except WireFormatError as exc:
        raise Invalid(exc.code, str(exc)) from None
    if stats.meta.get("client_id") != client_id:
        raise Invalid("client_mismatch", f"metadata client_id {stats.meta.get('client_id')!r} is not the client "
                       f"of this token ({client_id})")
    return stats


def bound_weights(statistics: list[HeadStatistics], factor: float = STATISTICS_WEIGHT_FACTOR
                  ) -> tuple[list[HeadStatistics], list[int]]:
    """Each client's weight in the pooled statistics bounded: a client with n_k > factor * median_low(n) has its
    S, n and G scaled by t = factor * median_low(n) / n_k (its class means and feature covariance unchanged).
    Returns the bounded statistics and the indices of the clients scaled down."""
    n = [float(s.class_counts.sum()) for s in statistics]
    bound = factor * stats_lib.median_low(n)
    bounded, scaled = [], []
    for k, (s, n_k) in enumerate(zip(statistics, n)):
        if n_k > bound > 0:
            t = bound / n_k
            s = HeadStatistics(s.class_sums * t, s.class_counts * t, s.feature_gram * t, s.meta)
            scaled.append(k)
        bounded.append(s)
    return bounded, scaled


def initial_global(rule, spec, statistics: list[HeadStatistics], *, head_init: str, global_rank: int, seed: int,
                   shrinkage: float = DEFAULT_SHRINKAGE, temperature: float = DEFAULT_TEMPERATURE) -> tuple[Adapter, dict]:
    """Global version 0: the rule's initial factors (`init_global(spec, global_rank, seed)`) and the closed-form
    `head_init` head (ncm | lda) from the pooled statistics; plus summary numbers (with the pooled
    class_counts, which the head rounds' plans carry). Pure: the server's round 0
    and the simulation's centralized baseline both start here."""
    weight_name, bias_name, _, _ = linear_head(spec)
    statistics, scaled = bound_weights(statistics)
    if scaled:
        log.warning("round 0: %d client(s) weigh more than %g x the median client; their statistics were scaled "
                    "down to that weight", len(scaled), STATISTICS_WEIGHT_FACTOR)
    pooled = pool(statistics)
    weight, bias, used = safe_class_head(pooled, head_init, shrinkage=shrinkage, temperature=temperature)
    if used != head_init:
        log.warning("round 0: the %s head is ill-conditioned on these features (logits above %g); using %s",
                    head_init, LOGIT_LIMIT, used)
    start = rule.init_global(spec, global_rank, seed)
    dense = dict(start.dense) | {weight_name: weight, bias_name: bias}
    summary = {"clients": len(statistics), "total_samples": pooled.n_samples, "head": used,
               "classes_seen": int((pooled.class_counts > 0).sum()), "classes": int(len(pooled.class_counts)),
               "weight_bounded": scaled,
               "class_counts": [int(round(c)) for c in pooled.class_counts]}
    return Adapter(lora=start.lora, dense=dense, meta=start.meta), summary
