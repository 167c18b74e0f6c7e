"""What `GET /v1/status` shows: the current round, the clients, and the history of aggregated rounds."""

from __future__ import annotations

from collections.abc import Callable

from hetlora.engine.combine import jsonable
from hetlora.protocol.energy import round_energy
from server_stub import liveness, queries
from server_stub.store import Store


def current_round(store: Store, rounds: int, closing: int | None) -> tuple[dict, bool]:
    """The open round (else the last one, or the one waiting for clients) as status shows it; and whether the
    run is finished."""
    r = queries.open_round(store)
    last = queries.last_round_number(store)
    finished = r is None and last >= rounds
    if r is None and not finished:
        return {"number": last + 1, "state": "waiting"}, False
    shown = r or store.select_one("SELECT * FROM rounds WHERE number = ?", (last,))
    info = {k: shown[k] for k in ("number", "state", "opened_at", "deadline", "selected", "extensions",
                                  "extension_reason")}
    info |= queries.ranks_and_indices(shown["plans"])
    info["uploads"] = [u["client_id"] for u in queries.uploads(store, shown["number"])]
    info["dropped"] = liveness.dropped(store, shown["number"])
    info["aggregating"] = closing == shown["number"]
    return info, finished


def clients(store: Store, planned_rank) -> list[dict]:
    """Registered clients in registration order; `rank` is the one they train at (`planned_rank(tier rank)`)."""
    rows = store.select("SELECT client_id, name, rank, requested_rank, pruned_rank, n_samples, registered_at "
                        "FROM clients ORDER BY seq")
    return [row | {"rank": planned_rank(row["rank"])} for row in rows]


def history(store: Store, stage_of: Callable[[int], str]) -> list[dict]:
    """One entry per aggregated round: its stage (`stage_of(round)`), who took part at which ranks, bytes up
    and down, the clients' training seconds and energy estimates (`round_energy`), the rule's statistics."""
    entries = []
    for r in store.select("SELECT * FROM rounds WHERE state = 'aggregated' ORDER BY number"):
        uploads = queries.uploads(store, r["number"])
        entries.append({
            "round": r["number"], "stage": stage_of(r["number"]), "opened_at": r["opened_at"],
            "aggregated_at": r["aggregated_at"],
            "selected": r["selected"], "clients": [u["client_id"] for u in uploads],
            "dropped": liveness.dropped(store, r["number"]),
            "ranks": queries.ranks_and_indices(r["plans"])["ranks"],
            "effective_ranks": {u["client_id"]: u["effective_rank"] for u in uploads},
            "n_samples": {u["client_id"]: u["n_samples"] for u in uploads},
            "bytes_up": sum(u["bytes"] for u in uploads), "bytes_down": _bytes_down(store, r["number"]),
            "energy": round_energy({u["client_id"]: u["energy"] for u in uploads}),
            "extensions": r["extensions"], "extension_reason": r["extension_reason"],
            "statistics": jsonable(r["statistics"]),  # rows stored before NaN was mapped to None
        })
    return entries


def _bytes_down(store: Store, round_number: int) -> int:
    """Adapter bytes served for a round, every download counted (a client that restarts downloads again)."""
    row = store.select_one("SELECT COALESCE(SUM(bytes), 0) AS total FROM downloads WHERE round = ?", (round_number,))
    return int(row["total"])
