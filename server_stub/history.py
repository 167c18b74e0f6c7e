"""What `GET /v1/status` shows: the current round, the clients, and the history of aggregated rounds."""

from __future__ import annotations

from collections.abc import Callable

from hetlora.engine.combine import jsonable
from hetlora.protocol.energy import round_energy
from server_stub import liveness
from server_stub.run_store import RunStore


def current_round(runs: RunStore, rounds: int, closing: int | None) -> tuple[dict, bool]:
    """The open round (else the last one, or the one waiting for clients) as status shows it; and whether the
    run is finished."""
    r = runs.open_round()
    last = runs.last_round_number()
    finished = r is None and last >= rounds
    if r is None and not finished:
        return {"number": last + 1, "state": "waiting"}, False
    shown = r or runs.round(last)
    info = {"number": shown.number, "state": shown.state, "opened_at": shown.opened_at, "deadline": shown.deadline,
            "selected": shown.selected, "extensions": shown.extensions, "extension_reason": shown.extension_reason}
    info |= shown.ranks_and_indices()
    info["uploads"] = [u["client_id"] for u in runs.uploads(shown.number)]
    info["dropped"] = liveness.dropped(runs.store, shown.number)
    info["aggregating"] = closing == shown.number
    return info, finished


def clients(runs: RunStore, planned_rank) -> list[dict]:
    """Registered clients in registration order; `rank` is the one they train at (`planned_rank(tier rank)`)."""
    return [row | {"rank": planned_rank(row["rank"])} for row in runs.registered()]


def history(runs: RunStore, stage_of: Callable[[int], str]) -> list[dict]:
    """One entry per aggregated round: its stage (`stage_of(round)`), who took part at which ranks, bytes up
    and down, the clients' training seconds and energy estimates (`round_energy`), the rule's statistics."""
    entries = []
    for r, row in runs.aggregated_rounds():
        uploads = runs.uploads(r.number)
        entries.append({
            "round": r.number, "stage": stage_of(r.number), "opened_at": r.opened_at,
            "aggregated_at": row["aggregated_at"],
            "selected": r.selected, "clients": [u["client_id"] for u in uploads],
            "dropped": liveness.dropped(runs.store, r.number),
            "ranks": r.ranks_and_indices()["ranks"],
            "effective_ranks": {u["client_id"]: u["effective_rank"] for u in uploads},
            "n_samples": {u["client_id"]: u["n_samples"] for u in uploads},
            "bytes_up": sum(u["bytes"] for u in uploads), "bytes_down": runs.bytes_down(r.number),
            "energy": round_energy({u["client_id"]: u["energy"] for u in uploads}),
            "extensions": r.extensions, "extension_reason": r.extension_reason,
            "statistics": jsonable(row["statistics"]),  # rows stored before NaN was mapped to None
        })
    return entries
