"""Pure numpy aggregation rules for heterogeneous-rank federated LoRA: fedavg, hetlora, hlora, plora.

Adapters follow the wire convention (scale folded in, dW = B @ A). Rules compute in float64
and return float32; they do no I/O and never mutate their inputs.

    rule = make_rule("hetlora", segment_average=True)
    global_ = rule.init_global(spec, global_rank=16, seed=0)
    view = rule.client_view(global_, rank=4)            # what a rank-4 client downloads
    global_ = rule.aggregate(global_, [ClientResult(upload, n_samples=120), ...])
"""

from __future__ import annotations

from dataclasses import fields

from hetlora.engine.aggregation.contract import AggregationRule, ClientResult
from hetlora.engine.aggregation.fedavg import FedAvgRule
from hetlora.engine.aggregation.hetlora import HetLoRARule
from hetlora.engine.aggregation.hlora import HLoRARule
from hetlora.engine.aggregation.plora import PLoRARule
from hetlora.engine.aggregation.stats import aggregate_statistics

_RULES = {rule.name: rule for rule in (FedAvgRule, HetLoRARule, HLoRARule, PLoRARule)}
RULES: tuple[str, ...] = tuple(_RULES)
OPTIONS: dict[str, tuple[str, ...]] = {name: tuple(f.name for f in fields(rule)) for name, rule in _RULES.items()}


def make_rule(name: str, **options) -> AggregationRule:
    """The rule called `name` with its options (hetlora: weighting, segment_average); ValueError otherwise."""
    if name not in _RULES:
        raise ValueError(f"unknown aggregation rule {name!r}; valid rules: {', '.join(RULES)}")
    unknown = sorted(set(options) - set(OPTIONS[name]))
    if unknown:
        valid = ", ".join(OPTIONS[name]) or "none"
        raise ValueError(f"aggregation rule {name!r} has no option {unknown[0]!r}; valid options: {valid}")
    return _RULES[name](**options)


__all__ = ["AggregationRule", "ClientResult", "RULES", "OPTIONS", "make_rule", "aggregate_statistics"]
