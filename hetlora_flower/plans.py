"""One node's plan for one round (the rule's configure step) and the checks of what it sends back.

Both are the HTTP server's: `rule.configure` makes the plan from the node's tier, and an update goes
through `hetlora.engine.upload_checks.check_update` against that plan. Pure: no Flower, no I/O.
"""

from __future__ import annotations

from hetlora.protocol.plan import ClientPlan
from hetlora.protocol.wire import decode, spec_tensors
from hetlora.engine.aggregation import ClientResult
from hetlora.engine.upload_checks import check_update as check_against_plan


def plan_for(config, rule, node, round_number: int, class_counts=None) -> ClientPlan:
    """The rule's plan for `node` (a nodes.Node with a tier) in round n of stage `config.stage(n)`: round 0 of a
    head run collects statistics; a head round's plan carries `class_counts`, round 0's pooled examples per class."""
    return rule.configure(round_number=round_number, client_key=node.name, tier=node.tier,
                          global_rank=config.global_rank, seed=config.seed, stage=config.stage(round_number),
                          training=config.training_for(round_number), class_counts=class_counts)


def check_update(config, plan: dict, client_id: str, body: bytes) -> ClientResult:
    """The update `body` decoded (its header within the spec's limits before it is parsed) and checked against the
    spec and `plan` (WireFormatError with a stable code)."""
    adapter = decode(body, max_tensors=spec_tensors(config.spec))
    checked = check_against_plan(adapter, plan, config.spec, round_number=plan["round"], client_id=client_id,
                                 aggregator=config.aggregator)
    return ClientResult(adapter=adapter, n_samples=checked.n_samples,
                        indices=tuple(plan["indices"]) if plan["indices"] is not None else None)

