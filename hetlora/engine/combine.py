"""A closing round's new global, the same for both transports: round 0's closed-form head from the pooled
statistics, or a head / LoRA round's pipeline (aggregation.pipeline: bounded influence, the robust option, the
rule or the mean head, the server optimiser); or, without round 0, the rule's start (first_global). Every
global comes back as it is stored and sent (global_with_meta: its version and the run's metadata). Clients are
named in the statistics (clipped, weight-bounded), which come back JSON-ready. Pure: the caller keeps the
anchors and the optimiser state."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hetlora.protocol.head_stats import HeadStatistics
from hetlora.protocol.plan import ClientPlan
from hetlora.protocol.wire import Adapter
from hetlora.engine.aggregation import ClientResult
from hetlora.engine.aggregation.pipeline import aggregate_round
from hetlora.engine.config import ServerConfig
from hetlora.engine.head_round import initial_global


@dataclass(frozen=True)
class Combined:
    """A round's new global, its JSON-ready statistics, and the anchors and optimiser state to keep."""

    new_global: Adapter
    statistics: dict
    anchors: dict
    optimizer_state: dict | None


def combine(rule, config: ServerConfig, round_number: int, previous: Adapter, names: list[str],
            results: list[ClientResult], plans: list[ClientPlan], anchors: dict,
            optimizer_state: dict | None) -> Combined:
    """A head or LoRA round's new global (version `round_number`) from its accepted updates, in selection order
    (`names[k]` sent `results[k]` under `plans[k]`); the statistics name the clipped clients and carry the bounds'
    anchors (the HTTP server reads the last ones back after a restart)."""
    new_global, statistics, anchors, optimizer_state = aggregate_round(
        rule, config, config.stage(round_number), previous, results, plans, anchors, optimizer_state)
    statistics["clipped"] = {names[k]: what for k, what in statistics["clipped"].items()}
    return Combined(global_with_meta(new_global, round_number, config), jsonable(statistics | {"anchors": anchors}),
                    anchors, optimizer_state)


def head_global(rule, config: ServerConfig, names: list[str], statistics: list[HeadStatistics]) -> tuple[Adapter, dict]:
    """Round 0: global version 0 and its JSON-ready summary (pooled class counts, the weight-bounded clients by
    name) from every client's checked statistics (`names[k]` sent `statistics[k]`)."""
    new_global, summary = initial_global(rule, config.spec, statistics, head_init=config.head_init,
                                         global_rank=config.global_rank, seed=config.seed,
                                         shrinkage=config.head_shrinkage, temperature=config.head_temperature)
    summary["weight_bounded"] = [names[k] for k in summary["weight_bounded"]]
    return global_with_meta(new_global, 0, config), jsonable(summary)


def first_global(rule, config: ServerConfig) -> Adapter:
    """Global version 0 of a run without round 0: the rule's initial factors and head (`--init-adapter` overlaid:
    init_adapter.run_rule)."""
    return global_with_meta(rule.init_global(config.spec, config.global_rank, config.seed), 0, config)


def global_with_meta(adapter: Adapter, version: int, config: ServerConfig) -> Adapter:
    """Global version n as it is stored and sent: the factors and dense tensors with their run's metadata."""
    meta = {"global_version": version, "round": version, "rank": adapter.rank, "aggregator": config.aggregator,
            "spec_fingerprint": config.spec.fingerprint}
    return Adapter(lora=adapter.lora, dense=adapter.dense, meta=meta)


def jsonable(value):
    """numpy scalars/arrays (and containers of them) as plain JSON types; NaN and +-Inf as None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic)):
        return jsonable(value.tolist())
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
