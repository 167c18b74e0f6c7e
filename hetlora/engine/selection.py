"""Who takes part in a round and in which order: seeded selection, the key that seeds and orders a client."""

from __future__ import annotations

import numpy as np


def select_clients(client_ids: list[str], k: int, seed: int, round_number: int) -> list[str]:
    """Up to k of `client_ids` (all when k is 0 or >= their number), drawn with numpy PCG64 seeded by (seed, round)."""
    if not k or k >= len(client_ids):
        return list(client_ids)
    picked = np.random.default_rng([seed, round_number]).choice(len(client_ids), size=k, replace=False)
    return [client_ids[i] for i in sorted(picked)]


def client_key(client: dict) -> str:
    """What seeds and orders a client: its name when it gave one (stable across re-registrations and
    identical runs), else its id."""
    return client["name"] or client["client_id"]


def client_order(client: dict) -> tuple:
    """Named clients first, by name, then by id: registration order (a race) never matters."""
    return (client["name"] is None, client["name"] or "", client["client_id"])
