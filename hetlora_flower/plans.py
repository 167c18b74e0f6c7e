"""One node's plan for one round, and the checks of what it sends back.

`plan_for` is the configure step: rank, the rule's component indices, the training mode, the seed.
`check_update` applies the HTTP server's upload checks (docs/PROTOCOL.md) to an update against that
plan and returns the rule's input. Both are pure: no Flower, no I/O.
"""

from __future__ import annotations

from edge_client.client import MODE_FOR_AGGREGATOR
from edge_client.wire import Adapter, WireFormatError, decode, meta_int, validate
from server_stub.aggregation import ClientResult
from server_stub.aggregation.bounds import check_values
from server_stub.rounds import training_seed

HEAD, LORA = "head", "lora"


def plan_for(config, rule, *, name: str, rank: int, round_number: int) -> dict:
    """What node `name` does in round n: {round, stage, client_id, rank, indices, mode, seed}."""
    stage = HEAD if round_number == 0 else LORA
    indices = None
    if stage == LORA:
        indices = rule.assign_indices(global_rank=config.global_rank, rank=rank, round_number=round_number,
                                      client_id=name, seed=config.seed)
    return {"round": round_number, "stage": stage, "client_id": name, "rank": rank,
            "indices": [int(i) for i in indices] if indices is not None else None,
            "mode": MODE_FOR_AGGREGATOR[config.aggregator], "seed": training_seed(config.seed, round_number, name)}


def check_update(config, rule, plan: dict, body: bytes) -> ClientResult:
    """The update `body` checked against the spec and `plan` (WireFormatError with a stable code)."""
    adapter = decode(body)
    meta = adapter.meta
    if meta_int(meta, "round", minimum=1) != plan["round"] or meta.get("client_id") != plan["client_id"]:
        raise WireFormatError("bad_metadata", f"the update says round {meta.get('round')} of "
                              f"{meta.get('client_id')!r}, the plan was round {plan['round']} of {plan['client_id']!r}")
    rank, effective_rank = meta_int(meta, "rank", minimum=1), meta_int(meta, "effective_rank", minimum=1)
    n_samples = meta_int(meta, "n_samples", minimum=1)
    if rank != plan["rank"]:
        raise WireFormatError("rank_mismatch", f"metadata rank {rank} is not the planned rank {plan['rank']}")
    tensor_rank = validate(adapter, config.spec, max_rank=rule.upload_rank_limit(plan["rank"]))
    check_values(adapter)
    if tensor_rank != effective_rank:
        raise WireFormatError("rank_mismatch", f"the tensors have rank {tensor_rank} but metadata effective_rank "
                              f"is {effective_rank}")
    if config.aggregator == "fedavg" and effective_rank != plan["rank"]:
        raise WireFormatError("rank_mismatch", f"fedavg is homogeneous: upload rank {effective_rank} must equal "
                              f"the planned rank {plan['rank']}")
    if plan["indices"] is not None and meta.get("indices") != plan["indices"]:
        raise WireFormatError("wrong_indices", f"metadata indices {meta.get('indices')!r} are not the planned "
                              f"indices {plan['indices']}")
    return ClientResult(adapter=adapter, n_samples=n_samples,
                        indices=tuple(plan["indices"]) if plan["indices"] is not None else None)


def download(config, rule, global_: Adapter, plan: dict) -> Adapter:
    """The rule's view of the global at the plan's rank, with the metadata the HTTP download carries."""
    view = rule.client_view(global_, plan["rank"])
    meta = {"round": plan["round"], "client_id": plan["client_id"], "rank": plan["rank"], "indices": plan["indices"],
            "aggregator": config.aggregator, "global_version": plan["round"] - 1,
            "spec_fingerprint": config.spec.fingerprint}
    return Adapter(lora=view.lora, dense=view.dense, meta=meta)
