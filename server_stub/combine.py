"""A closing round's new global and statistics from its stored uploads (the coordinator calls it outside its lock).

Round 0: the pooled head statistics -> global version 0 (hetlora.engine.head_round). A head or LoRA round: the
shared pipeline (hetlora.engine.aggregation.pipeline: bounded influence, the robust option, the rule or the mean
head, the server optimiser) with the anchors of the last aggregated round's statistics and the optimiser state
of the previous version (`blobs/optimizer/vNNNN.safetensors`, written before version n is committed).
"""

from __future__ import annotations

from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays

from hetlora.protocol.wire import Adapter, decode
from server_stub import history
from hetlora.engine.aggregation import ClientResult
from hetlora.engine.aggregation.pipeline import aggregate_round
from hetlora.engine.head_round import initial_global, load_statistics


def combine_round(coordinator, number: int, r: dict, uploads: list[dict]) -> tuple[Adapter, dict]:
    """The new global and its (JSON-ready) statistics from a closing round's uploads, in selection order."""
    config, store = coordinator.config, coordinator.store
    if config.stage(number) == "head-statistics":
        statistics = [load_statistics(config, store.read_blob(u["path"])) for u in uploads]
        new_global, summary = initial_global(coordinator.rule, config.spec, statistics, head_init=config.head_init,
                                             global_rank=config.global_rank, seed=config.seed,
                                             shrinkage=config.head_shrinkage, temperature=config.head_temperature)
        summary["weight_bounded"] = [uploads[k]["client_id"] for k in summary["weight_bounded"]]
        return new_global, history.jsonable(summary)
    with coordinator.lock:
        previous = coordinator.globals.adapter(number - 1)
        anchors = last_anchors(store)
    plans = [r["plans"][u["client_id"]] for u in uploads]
    results = [ClientResult(adapter=decode(store.read_blob(u["path"])), n_samples=u["n_samples"],
                            indices=tuple(plan["indices"]) if plan["indices"] is not None else None)
               for u, plan in zip(uploads, plans)]
    state_path = f"optimizer/v{number - 1:04d}.safetensors"
    state = load_arrays(store.read_blob(state_path)) if store.blob_exists(state_path) else {}
    new_global, statistics, anchors, state = aggregate_round(coordinator.rule, config, config.stage(number), previous,
                                                             results, plans, anchors, state)
    if config.server_opt.name != "none" and config.stage(number) == "lora":
        store.write_blob(f"optimizer/v{number:04d}.safetensors", save_arrays(state))
    statistics["clipped"] = {uploads[k]["client_id"]: what for k, what in statistics["clipped"].items()}
    statistics["anchors"] = anchors
    return new_global, history.jsonable(statistics)


def last_anchors(store) -> dict:
    """The bound anchors after the last aggregated round (stage -> quantity -> anchor; {} before any)."""
    row = store.select_one("SELECT statistics FROM rounds WHERE state = 'aggregated' AND number > 0 "
                           "ORDER BY number DESC LIMIT 1")
    return dict((row or {}).get("statistics") or {}).get("anchors", {})
