"""Read-only questions about the run's rows that several parts of the server ask (the caller holds the lock)."""

from __future__ import annotations

from server_stub.store import Store


def open_round(store: Store) -> dict | None:
    return store.select_one("SELECT * FROM rounds WHERE state = 'open'")


def last_round_number(store: Store) -> int:
    row = store.select_one("SELECT MAX(number) AS n FROM rounds")
    return row["n"] or 0


def client(store: Store, client_id: str) -> dict:
    return store.select_one("SELECT * FROM clients WHERE client_id = ?", (client_id,))


def upload(store: Store, round_number: int, client_id: str) -> dict | None:
    return store.select_one("SELECT * FROM uploads WHERE round = ? AND client_id = ?", (round_number, client_id))


def uploads(store: Store, round_number: int) -> list[dict]:
    return store.select("SELECT * FROM uploads WHERE round = ? ORDER BY received_at", (round_number,))


def round_statistics(store: Store, round_number: int) -> dict:
    """The statistics an aggregated round recorded (round 0: the pooled head statistics' summary)."""
    return store.select_one("SELECT statistics FROM rounds WHERE number = ?", (round_number,))["statistics"]


def ranks_and_indices(plans: dict) -> dict:
    """The round's planned rank and (plora) indices per client, as status and history show them."""
    return {"ranks": {c: p["rank"] for c, p in plans.items()},
            "indices": {c: p["indices"] for c, p in plans.items() if p["indices"] is not None}}
