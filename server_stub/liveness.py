"""Liveness: a selected client that misses a round's deadline is dropped from the round, and a client
that keeps missing is not selected again until it shows up.

Tables (store.SCHEMA): `dropped (round, client_id)`: the clients dropped from a round at its deadline;
`liveness (client_id, missed)`: consecutive deadlines a client was selected for and had not uploaded by.
Any request a client makes with its token (round poll, download, upload) sets `missed` back to 0.
Clients with missed >= MISS_LIMIT are absent: not selected, not replacements, not counted for min_clients.
"""

from __future__ import annotations

from server_stub.store import Store

MISS_LIMIT = 2


def seen(store: Store, client_id: str) -> None:
    """The client made a request: it is live again (one read; a write only when it had missed)."""
    row = store.select_one("SELECT missed FROM liveness WHERE client_id = ?", (client_id,))
    if row is not None and row["missed"]:
        with store.transaction():
            store.update("liveness", {"client_id": client_id}, {"missed": 0})


def absent(store: Store) -> set[str]:
    return {r["client_id"] for r in store.select("SELECT client_id FROM liveness WHERE missed >= ?", (MISS_LIMIT,))}


def dropped(store: Store, round_number: int) -> list[str]:
    return [r["client_id"] for r in store.select("SELECT client_id FROM dropped WHERE round = ? ORDER BY rowid",
                                                 (round_number,))]


def drop(store: Store, round_number: int, client_ids: list[str]) -> None:
    """Inside a transaction: drop these clients from the round and count the miss."""
    for client_id in client_ids:
        store.db.execute("INSERT OR IGNORE INTO dropped (round, client_id) VALUES (?, ?)", (round_number, client_id))
        store.db.execute("INSERT INTO liveness (client_id, missed) VALUES (?, 1) "
                         "ON CONFLICT (client_id) DO UPDATE SET missed = missed + 1", (client_id,))


def replacements(store: Store, selected: list[str], needed: int) -> list[str]:
    """Up to `needed` live registered clients not yet `selected` for the round, in registration order."""
    taken, gone = set(selected), absent(store)
    candidates = [c["client_id"] for c in store.select("SELECT client_id FROM clients ORDER BY seq")]
    return [c for c in candidates if c not in taken and c not in gone][:max(needed, 0)]
