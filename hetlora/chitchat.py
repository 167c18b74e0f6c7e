"""The default chat data: the Chit Chat Challenge corpus (PyPI `chitchat-dataset` 0.9.0, MIT licence).

7,168 conversations between 1,315 participants; a conversation is a list of turns, a turn the consecutive
messages of one sender. Each row here is one reply: the previous turn as `prompt`, the turn as `response`,
its sender as `user` (the person whose device would hold it) and the conversation id as `conversation`.
A turn's messages are joined with newlines, as they appeared one under the other.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from hetlora.errors import UserError

DISTRIBUTION = "chitchat-dataset"


def corpus_path() -> Path:
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the default chat data is not installed: pip install {DISTRIBUTION}==0.9.0 (make install "
                        "does), or pass --data FILE with prompt,response[,user] rows")
    return Path(list(spec.submodule_search_locations)[0]) / "dataset.json"


def chitchat_rows(path: Path | None = None) -> list[dict]:
    """Every reply of the corpus as {prompt, response, user, conversation}, in corpus order."""
    doc = json.loads((path or corpus_path()).read_text(encoding="utf-8"))
    rows = []
    for conversation, entry in doc.items():
        turns = entry["messages"]
        for previous, turn in zip(turns, turns[1:]):
            if not _text(turn):
                continue  # 11 replies of the corpus have no text
            rows.append({"prompt": _text(previous), "response": _text(turn), "user": turn[0]["sender"],
                         "conversation": conversation})
    return rows


def _text(turn: list[dict]) -> str:
    return "\n".join(message["text"].strip() for message in turn)
