"""One round's aggregation, the same for the HTTP server and the Flower strategy (pure: no I/O).

    starts    what each client started from: the rule's `upload_start` of the previous global for its plan
              (a head round: the previous head)
    defence   bounded influence with the anchored reference, then the robust option (robust.Defence.apply)
    combine   a LoRA round: rule.aggregate, then the server optimiser's step; a head round: the mean head
              (head_fit.average_heads), factors kept
The anchors (per stage) and the optimiser state come in and go out, so the caller keeps them (the HTTP server in
its store, the Flower strategy in memory).
"""

from __future__ import annotations

from hetlora.protocol.plan import ClientPlan
from hetlora.protocol.wire import Adapter
from hetlora.engine.aggregation.base import rank_of
from hetlora.engine.aggregation.contract import ClientResult
from hetlora.engine.aggregation.head_fit import average_heads
from hetlora.engine.aggregation.stats import aggregate_statistics


def upload_starts(rule, previous: Adapter, plans: list[ClientPlan], stage: str) -> list[Adapter]:
    """Per client (its plan): the adapter its upload's components started from."""
    if stage == "head-fit":
        return [Adapter(lora={}, dense=previous.dense) for _ in plans]
    return [rule.upload_start(previous, plan.rank, plan.indices) for plan in plans]


def aggregate_round(rule, config, stage: str, previous: Adapter, results: list[ClientResult], plans: list[ClientPlan],
                    anchors: dict, optimizer_state: dict | None = None) -> tuple[Adapter, dict, dict, dict | None]:
    """(new global, statistics, anchors, optimiser state) of a head-fit or LoRA round. `config`: the run's
    ServerConfig (defence, server optimiser, rule name); `anchors`: stage -> quantity -> anchor."""
    starts = upload_starts(rule, previous, plans, stage)
    index_sets = [] if stage == "head-fit" else [
        rule.component_indices(res, res.adapter.rank, rank_of(previous)) for res in results]
    bounded, clipped, stage_anchors = config.defence.apply(starts, results, index_sets, anchors.get(stage, {}))
    anchors = {**anchors, stage: stage_anchors}
    if stage == "head-fit":
        new_global, statistics = average_heads(previous, bounded)
    else:
        new_global = rule.aggregate(previous, bounded)
        if config.server_opt.name != "none":
            new_global, optimizer_state = config.server_opt.step(previous, new_global, optimizer_state or {},
                                                                 product_space=rule.name == "hlora")
        statistics = aggregate_statistics(new_global, bounded)
    statistics |= {"clipped": clipped, "robust": config.defence.robust}
    return new_global, statistics, anchors, optimizer_state
