"""The enrollment secret, read from a file by the server (`--enroll-secret-file`) and the client alike."""

from __future__ import annotations

from pathlib import Path

from hetlora.errors import UserError


def read_secret(path: str) -> str:
    """The enrollment secret in a file, surrounding whitespace stripped."""
    try:
        secret = Path(path).read_text().strip()
    except OSError as exc:
        raise UserError(f"cannot read the enrollment secret file {path}: {exc.strerror}") from None
    if not secret:
        raise UserError(f"the enrollment secret file {path} is empty")
    return secret
