"""Helpers several test files share (imported from here, never from another test module)."""

from __future__ import annotations

import json


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def chat_rows(n_users=12, conversations=6, replies=5):
    """Two-person conversations: user i talks with user (i + 1) % n, `replies` replies each."""
    rows = []
    for i in range(n_users):
        for c in range(conversations):
            conv = f"c{i}-{c}"
            for t in range(replies):
                for user in (f"u{i}", f"u{(i + 1) % n_users}"):
                    rows.append({"prompt": f"{conv} turn {t}", "response": f"{user} says {t}", "user": user,
                                 "conversation": conv})
    return rows
