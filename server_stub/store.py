"""Durable server state: SQLite (WAL) for clients, rounds, uploads and global versions; blobs as files.

A blob is written to a temp file, fsynced and renamed before the row that names it is
committed, so after a crash every row points to a complete file. What a crash can leave
behind, temp files and blobs whose row was never committed, `sweep` removes at start-up.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from contextlib import contextmanager
from pathlib import Path

from hetlora.protocol import atomic
from hetlora.errors import UserError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS clients (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    client_id TEXT UNIQUE NOT NULL,
    token_sha256 TEXT UNIQUE NOT NULL,
    name TEXT,
    profile TEXT NOT NULL,
    requested_rank INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    caps TEXT NOT NULL,
    pruned_rank INTEGER,
    n_samples INTEGER NOT NULL,
    registered_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    number INTEGER PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('open', 'aggregated')),
    selected TEXT NOT NULL,
    plans TEXT NOT NULL,
    opened_at REAL NOT NULL,
    deadline REAL NOT NULL,
    extensions INTEGER NOT NULL DEFAULT 0,
    extension_reason TEXT,
    aggregated_at REAL,
    statistics TEXT
);
CREATE TABLE IF NOT EXISTS uploads (
    round INTEGER NOT NULL,
    client_id TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    path TEXT NOT NULL,
    rank INTEGER NOT NULL,
    effective_rank INTEGER NOT NULL,
    n_samples INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    received_at REAL NOT NULL,
    energy TEXT,
    PRIMARY KEY (round, client_id)
);
CREATE TABLE IF NOT EXISTS downloads (
    round INTEGER NOT NULL,
    client_id TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    served_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS dropped (
    round INTEGER NOT NULL,
    client_id TEXT NOT NULL,
    PRIMARY KEY (round, client_id)
);
CREATE TABLE IF NOT EXISTS liveness (
    client_id TEXT PRIMARY KEY,
    missed INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS globals (
    version INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""

JSON_COLUMNS = ("profile", "caps", "selected", "plans", "statistics", "energy")
log = logging.getLogger("hetlora.server")


class Store:
    """One SQLite connection (serialised by the caller's lock) plus the blob directory."""

    def __init__(self, state_dir: str | os.PathLike):
        self.root = Path(state_dir)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.root / "state.sqlite", check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise UserError(f"cannot use the state dir {self.root}: {exc}") from None
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(rounds)")}
        if "plans" not in columns:
            raise UserError(f"the state dir {self.root} was written by an older hetlora (rounds without client "
                            "plans); finish that run with the older version or use a new --state-dir")
        if "energy" not in {row[1] for row in self.db.execute("PRAGMA table_info(uploads)")}:
            self.db.execute("ALTER TABLE uploads ADD COLUMN energy TEXT")  # uploads before energy reports: NULL

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self):
        """All statements inside commit together or not at all."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # --- run identity -------------------------------------------------------------------------
    def bind_identity(self, identity: dict) -> None:
        """Record the run identity in a fresh state dir, or refuse a state dir made for another run."""
        row = self.db.execute("SELECT value FROM meta WHERE key = 'identity'").fetchone()
        if row is None:
            self.db.execute("INSERT INTO meta VALUES ('identity', ?)", (json.dumps(identity, sort_keys=True),))
            return
        stored = json.loads(row["value"])
        differing = sorted(k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k))
        if differing:
            changes = "; ".join(f"{k}: {_short(stored.get(k))} there, {_short(identity.get(k))} now" for k in differing)
            raise UserError(f"the state dir {self.root} belongs to another run ({changes}); use a new --state-dir "
                            "or start with the same model, targets, labels, aggregator options, global rank and seed")

    # --- blobs ---------------------------------------------------------------------------------
    def sweep(self) -> list[str]:
        """Delete crash leftovers (call before serving): atomic-write temp files (`.<name>.*.tmp`) anywhere in
        the state dir, and blobs no `uploads` or `globals` row names (a server optimiser's state
        `optimizer/vNNNN.safetensors` belongs to the row of `globals/vNNNN.safetensors`). Returns the removed
        paths (logged)."""
        named = {row[0] for row in self.db.execute("SELECT path FROM uploads UNION SELECT path FROM globals")}
        named |= {"optimizer/" + p.partition("/")[2] for p in named if p.startswith("globals/")}
        blobs = self.root / "blobs"
        removed = [p for p in self.root.rglob(".*.tmp") if p.is_file()]
        removed += [p for p in blobs.rglob("*") if p.is_file() and not p.name.endswith(".tmp")
                    and p.relative_to(blobs).as_posix() not in named]
        for path in removed:
            path.unlink(missing_ok=True)
        names = [p.relative_to(self.root).as_posix() for p in removed]
        if names:
            log.warning("start-up cleanup in %s: removed %d crash leftover(s): %s", self.root, len(names),
                        ", ".join(names[:10]) + (" ..." if len(names) > 10 else ""))
        return names

    def write_blob(self, relpath: str, data: bytes) -> None:
        atomic.write_bytes(self.root / "blobs" / relpath, data)

    def delete_blob(self, relpath: str) -> None:
        (self.root / "blobs" / relpath).unlink(missing_ok=True)

    def read_blob(self, relpath: str) -> bytes:
        return (self.root / "blobs" / relpath).read_bytes()

    def blob_exists(self, relpath: str) -> bool:
        return (self.root / "blobs" / relpath).is_file()

    # --- rows ----------------------------------------------------------------------------------
    def insert(self, table: str, row: dict) -> None:
        values = [json.dumps(v) if k in JSON_COLUMNS else v for k, v in row.items()]
        self.db.execute(f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", values)

    def update(self, table: str, where: dict, values: dict) -> None:
        sets = ", ".join(f"{k} = ?" for k in values)
        conds = " AND ".join(f"{k} = ?" for k in where)
        params = [json.dumps(v) if k in JSON_COLUMNS else v for k, v in values.items()] + list(where.values())
        self.db.execute(f"UPDATE {table} SET {sets} WHERE {conds}", params)

    def select(self, sql: str, params: tuple = ()) -> list[dict]:
        return [_decode(row) for row in self.db.execute(sql, params).fetchall()]

    def select_one(self, sql: str, params: tuple = ()) -> dict | None:
        rows = self.select(sql, params)
        return rows[0] if rows else None


def _short(value, limit: int = 40) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _decode(row: sqlite3.Row) -> dict:
    return {k: (json.loads(row[k]) if k in JSON_COLUMNS and row[k] is not None else row[k]) for k in row.keys()}
