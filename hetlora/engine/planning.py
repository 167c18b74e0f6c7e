"""The configure step and what each client receives: who takes part, each client's plan, its download.

Both transports call these (the HTTP coordinator when a round opens, the Flower strategy in configure_train),
so a round is planned once, in one way.
"""

from __future__ import annotations

from hetlora.protocol.plan import ClientPlan, Tier
from hetlora.protocol.wire import Adapter
from hetlora.engine.config import ServerConfig
from hetlora.engine.selection import select_clients


def select(config: ServerConfig, candidates: list[str], round_number: int) -> list[str]:
    """Who takes part in round n among `candidates` (in the run's client order): `config.round_size(n)` of them,
    drawn with the run's seed (every one in a head stage)."""
    return select_clients(candidates, config.round_size(round_number), config.seed, round_number)


def plan_for(config: ServerConfig, rule, client_key: str, tier: Tier, round_number: int,
             class_counts=None) -> ClientPlan:
    """The rule's plan for one client (`client_key` seeds it) at its `tier` in round n of stage `config.stage(n)`;
    a head round's plan carries `class_counts`, round 0's pooled examples per class."""
    return rule.configure(round_number=round_number, client_key=client_key, tier=tier,
                          global_rank=config.global_rank, seed=config.seed, stage=config.stage(round_number),
                          training=config.training_for(round_number), class_counts=class_counts)


def download_view(rule, previous: Adapter, plan: ClientPlan, client_id: str, config: ServerConfig) -> Adapter:
    """What a client downloads for round n = plan.round: the rule's view of global version n-1 at the plan's rank
    (a head round: the head alone), with the metadata the client checks against its plan."""
    head_only = plan.mode == "head-fit"
    view = Adapter(lora={}, dense=previous.dense) if head_only else rule.client_view(previous, plan.rank)
    meta = {"round": plan.round, "client_id": client_id, "rank": plan.rank,
            "indices": list(plan.indices) if plan.indices is not None else None,
            "aggregator": config.aggregator, "global_version": plan.round - 1,
            "spec_fingerprint": config.spec.fingerprint}
    return Adapter(lora=view.lora, dense=view.dense, meta=meta)
