"""The label list of a classification run: one reader for the server, the client tools and the exporter."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hetlora.errors import UserError


def read_labels(path: str | os.PathLike) -> tuple[str, ...]:
    """Labels from a JSON list of strings or a text file with one label per line (blank lines skipped).
    UserError when the file is missing or unreadable, not a list of strings, has fewer than 2 labels
    (a classifier needs 2) or lists one twice."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read the label file {path}: {exc.strerror}") from None
    if text.lstrip().startswith("["):
        try:
            labels = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"label file {path} is not a valid JSON list: {exc.msg}") from None
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise UserError(f"label file {path}: every label in the JSON list must be a string")
    else:
        labels = [line.strip() for line in text.splitlines() if line.strip()]
    if len(labels) < 2:
        raise UserError(f"label file {path} has {len(labels)} labels; classification needs at least 2")
    if len(set(labels)) != len(labels):
        raise UserError(f"label file {path} lists a label twice (duplicates are not allowed)")
    return tuple(labels)
