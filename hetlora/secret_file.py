"""Secrets read from files: the enrollment secret (server and client) and the operator's admin token."""

from __future__ import annotations

from pathlib import Path

from hetlora.errors import UserError


def read_secret(path: str, what: str = "enrollment secret") -> str:
    """The secret (`what`: the enrollment secret, the admin token) in a file, surrounding whitespace stripped."""
    try:
        secret = Path(path).read_text().strip()
    except OSError as exc:
        raise UserError(f"cannot read the {what} file {path}: {exc.strerror}") from None
    if not secret:
        raise UserError(f"the {what} file {path} is empty")
    return secret
