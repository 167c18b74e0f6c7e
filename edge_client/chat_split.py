"""Split chat rows by person: each device holds the replies of its own users, and two test sets stay apart.

Rows are {prompt, response, user[, conversation]} (a row without `conversation` is its own conversation).
Seeded, in this order:
1. eligible users have at least `min_replies` rows; `clients * users_per_client` of them are drawn and dealt
   to the devices;
2. personalisation: whole conversations of each training user, drawn until they hold about a
   `heldout_fraction` of the user's replies, are held out; their rows by training users form the `personal`
   test set, and no row of a held-out conversation is trained on;
3. generalisation: the conversations in which no training user replies at all (so neither their prompts
   nor their replies were ever trained on) are cut in two by a seeded coin per conversation: `unseen`, the
   test set, and `validation`, for choosing settings without looking at the test set.
Each set is sampled down to `test_rows` rows.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from hetlora.errors import UserError


@dataclass
class ChatSplit:
    clients: list[list[dict]]  # training rows per device
    users: list[list[str]]  # the users behind each device
    personal: list[dict]  # held-out conversations of the training users (their replies)
    unseen: list[dict]  # conversations without any training user (test)
    validation: list[dict]  # other conversations without any training user (validation)


def conversation_of(row: dict, index: int) -> str:
    return str(row.get("conversation") or f"row-{index}")


def split_by_user(rows: list[dict], clients: int, *, users_per_client: int = 1, min_replies: int = 100,
                  heldout_fraction: float = 0.1, test_rows: int = 300, seed: int = 0) -> ChatSplit:
    """The split of the module docstring; UserError when the data cannot give it."""
    if clients < 1 or users_per_client < 1:
        raise UserError(f"--clients and --users-per-client must be at least 1, got {clients} and {users_per_client}")
    if not 0 <= heldout_fraction < 1:
        raise UserError(f"the held-out fraction must be in [0, 1), got {heldout_fraction}")
    if any(not str(r.get("user") or "") for r in rows):
        raise UserError("splitting by user needs a non-empty 'user' in every row")
    rng = np.random.default_rng([seed, 11])
    by_user: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_user[str(row["user"])].append(i)
    eligible = sorted(u for u, idx in by_user.items() if len(idx) >= min_replies)
    wanted = clients * users_per_client
    if len(eligible) < wanted:
        raise UserError(f"{clients} devices x {users_per_client} users need {wanted} users with at least "
                        f"{min_replies} replies; the data has {len(eligible)}: lower --clients or --min-replies")
    chosen = [eligible[i] for i in rng.permutation(len(eligible))[:wanted]]
    users = [chosen[k * users_per_client:(k + 1) * users_per_client] for k in range(clients)]
    heldout = _heldout_conversations(rows, chosen, by_user, heldout_fraction, rng)
    touched = {conversation_of(rows[i], i) for u in chosen for i in by_user[u]}
    parts = [[rows[i] for u in group for i in by_user[u] if conversation_of(rows[i], i) not in heldout]
             for group in users]
    personal = [rows[i] for u in chosen for i in by_user[u] if conversation_of(rows[i], i) in heldout]
    untouched = sorted({conversation_of(row, i) for i, row in enumerate(rows)} - touched)
    test_half = {c for c, coin in zip(untouched, rng.random(len(untouched))) if coin < 0.5}
    unseen, validation = [], []
    for i, row in enumerate(rows):
        conv = conversation_of(row, i)
        if conv not in touched:
            (unseen if conv in test_half else validation).append(row)
    return ChatSplit(parts, users, _sample(personal, test_rows, rng), _sample(unseen, test_rows, rng),
                     _sample(validation, test_rows, rng))


def _heldout_conversations(rows, chosen, by_user, fraction: float, rng) -> set[str]:
    """Per training user, conversations in a seeded order, each kept out when the user's held-out replies
    stay within `fraction` of theirs (a conversation bigger than that is skipped, so training keeps the rest)."""
    held: set[str] = set()
    for user in chosen:
        sizes: dict[str, int] = defaultdict(int)
        for i in by_user[user]:
            sizes[conversation_of(rows[i], i)] += 1
        convs, budget, taken = sorted(sizes), fraction * len(by_user[user]), 0
        for j in rng.permutation(len(convs)):
            if taken + sizes[convs[j]] <= budget:
                held.add(convs[j])
                taken += sizes[convs[j]]
    return held


def _sample(rows: list[dict], n: int, rng) -> list[dict]:
    if len(rows) <= n:
        return rows
    return [rows[i] for i in np.sort(rng.permutation(len(rows))[:n])]
