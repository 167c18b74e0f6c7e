"""Frozen base weights stored once per export folder and shared by every rank of one backend."""

from __future__ import annotations

import os
from pathlib import Path

from hetlora.errors import UserError


def keep_shared_file(fresh: Path, shared: Path, *, first: bool) -> Path:
    """Move `fresh` to `shared` (the export's first rank, or no shared file yet), else check they are
    byte-identical and drop `fresh`. Returns `shared`."""
    if first or not shared.exists():
        os.replace(fresh, shared)
    elif fresh.read_bytes() != shared.read_bytes():
        fresh.unlink()
        raise UserError(f"this rank's frozen weights differ from {shared} written for an earlier rank, so they "
                        f"cannot be shared; please report this, and export one rank per --out meanwhile")
    else:
        fresh.unlink()
    return shared
