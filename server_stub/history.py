"""What `GET /v1/status` shows: the current round, the clients, and the history of aggregated rounds."""

from __future__ import annotations

from collections.abc import Callable

from hetlora.engine.history import planned, round_entry
from hetlora.engine.upload_checks import CheckedUpdate
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
    info |= planned(shown.plans)
    info["uploads"] = [u["client_id"] for u in runs.uploads(shown.number)]
    info["dropped"] = liveness.dropped(runs.store, shown.number)
    info["aggregating"] = closing == shown.number
    return info, finished


def clients(runs: RunStore, planned_rank) -> list[dict]:
    """Registered clients in registration order; `rank` is the one they train at (`planned_rank(tier rank)`)."""
    return [row | {"rank": planned_rank(row["rank"])} for row in runs.registered()]


def history(runs: RunStore, stage_of: Callable[[int], str]) -> list[dict]:
    """One entry per aggregated round: the engine's entry (hetlora.engine.history.round_entry: stage, plans, the
    combined clients in selection order with their checked ranks, samples and energy, the statistics) and the
    HTTP run's own fields: when it opened and aggregated, who was selected and dropped, bytes up and down,
    deadline extensions."""
    entries = []
    for r, row in runs.aggregated_rounds():
        uploads = {u["client_id"]: u for u in runs.uploads(r.number)}
        accepted = {c: CheckedUpdate(uploads[c]["rank"], uploads[c]["effective_rank"], uploads[c]["n_samples"],
                                     uploads[c]["energy"]) for c in r.selected if c in uploads}
        entry = round_entry(r.number, stage_of(r.number), r.plans, accepted, row["statistics"])
        entries.append(entry | {
            "opened_at": r.opened_at, "aggregated_at": row["aggregated_at"], "selected": r.selected,
            "dropped": liveness.dropped(runs.store, r.number),
            "bytes_up": sum(u["bytes"] for u in uploads.values()), "bytes_down": runs.bytes_down(r.number),
            "extensions": r.extensions, "extension_reason": r.extension_reason})
    return entries
