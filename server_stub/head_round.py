"""Round 0, the head-initialisation round: checks of a statistics upload and the initial global.

Enabled by `ServerConfig.head_init` (ncm | lda) for classification runs. Every client registered
when round 0 opens uploads its per-class feature statistics (hetlora.protocol.head_stats) instead of an
adapter; the server pools them and sets the head of global version 0 in closed form
(server_stub.aggregation.head_init); the LoRA factors are the rule's usual initial ones.
"""

from __future__ import annotations

import logging

from hetlora.protocol.head_stats import HeadStatistics, decode_statistics
from hetlora.protocol.spec import linear_head
from hetlora.protocol.wire import Adapter, WireFormatError
from server_stub.aggregation.head_init import DEFAULT_SHRINKAGE, DEFAULT_TEMPERATURE, LOGIT_LIMIT, pool, safe_class_head
from server_stub.errors import ApiError

log = logging.getLogger("hetlora.server")
HEAD_ROUND = 0
# Pooled features a head may read, and the longest such a feature can be (None: no bound).
FEATURE_NORM_BOUND = {"mean": 1.0}


def load_statistics(config, body: bytes) -> HeadStatistics:
    """Statistics bytes decoded and checked against the run's head shapes and pooling (WireFormatError)."""
    _, _, num_labels, dim = linear_head(config.spec)
    return decode_statistics(body, num_labels=num_labels, dim=dim,
                             max_feature_norm=FEATURE_NORM_BOUND.get(config.spec.pooling))


def check_statistics(config, client_id: str, body: bytes) -> HeadStatistics:
    """A round-0 upload decoded and checked (400 ApiError with the wire code otherwise)."""
    try:
        stats = load_statistics(config, body)
    except WireFormatError as exc:
        raise ApiError(400, exc.code, str(exc)) from None
    if stats.meta.get("client_id") != client_id:
        raise ApiError(400, "client_mismatch", f"metadata client_id {stats.meta.get('client_id')!r} is not the client "
                       f"of this token ({client_id})")
    if stats.meta.get("round") != HEAD_ROUND:
        raise ApiError(400, "bad_metadata", f"head statistics must say round {HEAD_ROUND}")
    return stats


def initial_global(rule, spec, statistics: list[HeadStatistics], *, head_init: str, global_rank: int, seed: int,
                   shrinkage: float = DEFAULT_SHRINKAGE, temperature: float = DEFAULT_TEMPERATURE) -> tuple[Adapter, dict]:
    """Global version 0: the rule's initial factors (`init_global(spec, global_rank, seed)`) and the closed-form
    `head_init` head (ncm | lda) from the pooled statistics; plus summary numbers (with the pooled
    class_counts, which the head rounds' plans carry). Pure: the server's round 0
    and the simulation's centralized baseline both start here."""
    weight_name, bias_name, _, _ = linear_head(spec)
    pooled = pool(statistics)
    weight, bias, used = safe_class_head(pooled, head_init, shrinkage=shrinkage, temperature=temperature)
    if used != head_init:
        log.warning("round 0: the %s head is ill-conditioned on these features (logits above %g); using %s",
                    head_init, LOGIT_LIMIT, used)
    start = rule.init_global(spec, global_rank, seed)
    dense = dict(start.dense) | {weight_name: weight, bias_name: bias}
    summary = {"clients": len(statistics), "total_samples": pooled.n_samples, "head": used,
               "classes_seen": int((pooled.class_counts > 0).sum()), "classes": int(len(pooled.class_counts)),
               "class_counts": [int(round(c)) for c in pooled.class_counts]}
    return Adapter(lora=start.lora, dense=dense, meta=start.meta), summary
