"""A closed round's history entry, the same for both transports (GET /v1/status's history, a Flower run's
history.json): who was planned at which rank, whose updates were combined, what they reported, the statistics.

Pure: the caller passes what it kept (the HTTP server reads its upload rows, the Flower strategy its checked
replies) and adds its transport's own fields (timestamps and bytes on HTTP, the local losses under Flower).
"""

from __future__ import annotations

from hetlora.engine.combine import jsonable
from hetlora.engine.upload_checks import CheckedUpdate
from hetlora.protocol.energy import round_energy
from hetlora.protocol.plan import ClientPlan


def planned(plans: dict[str, ClientPlan]) -> dict:
    """The planned rank and (plora) indices per client, as the status and the history show them."""
    return {"ranks": {c: p.rank for c, p in plans.items()},
            "indices": {c: list(p.indices) for c, p in plans.items() if p.indices is not None}}


def round_entry(round_number: int, stage: str, plans: dict[str, ClientPlan], accepted: dict[str, CheckedUpdate],
                statistics: dict) -> dict:
    """Round n's entry: its `stage`, every client's plan (`plans`), the combined clients in selection order (the
    keys of `accepted`, each with its checked update: effective rank, samples, energy report, `round_energy`'s
    totals) and the combine step's `statistics`, JSON-ready."""
    return jsonable({
        "round": round_number, "stage": stage, "clients": list(accepted), **planned(plans),
        "effective_ranks": {c: u.effective_rank for c, u in accepted.items()},
        "n_samples": {c: u.n_samples for c, u in accepted.items()},
        "energy": round_energy({c: u.energy for c, u in accepted.items()}),
        "statistics": statistics,
    })
