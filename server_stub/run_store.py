"""The run's rows and blobs as the coordinator needs them, typed: every SQL statement of the round state machine,
the blob path formats and the server optimiser's state files live here.

Plans are ClientPlan objects above this module and JSON in the `rounds` table (the store boundary). The caller
holds the coordinator's lock and opens the transactions (`transaction()`).
"""

from __future__ import annotations

from dataclasses import dataclass

from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays

from hetlora.protocol.plan import ClientPlan, Tier
from server_stub.store import Store


@dataclass(frozen=True)
class Round:
    """One round's row: who is selected, each one's plan, the deadline and how often it was extended."""

    number: int
    state: str
    selected: list[str]
    plans: dict[str, ClientPlan]
    opened_at: float
    deadline: float
    extensions: int = 0
    extension_reason: str | None = None

    @classmethod
    def from_row(cls, row: dict) -> "Round":
        return cls(number=row["number"], state=row["state"], selected=list(row["selected"]),
                   plans={c: ClientPlan.from_json(p) for c, p in row["plans"].items()}, opened_at=row["opened_at"],
                   deadline=row["deadline"], extensions=row["extensions"], extension_reason=row["extension_reason"])


def upload_path(round_number: int, client_id: str, digest: str) -> str:
    return f"uploads/r{round_number:04d}/{client_id}-{digest[:16]}.safetensors"


def optimizer_path(version: int) -> str:
    """The server optimiser's state after global version n (store.sweep keeps it with `globals/vNNNN`)."""
    return f"optimizer/v{version:04d}.safetensors"


class RunStore:
    def __init__(self, store: Store):
        self.store = store

    def transaction(self):
        return self.store.transaction()

    # --- rounds ------------------------------------------------------------------------------------------
    def open_round(self) -> Round | None:
        row = self.store.select_one("SELECT * FROM rounds WHERE state = 'open'")
        return Round.from_row(row) if row is not None else None

    def round(self, number: int) -> Round | None:
        row = self.store.select_one("SELECT * FROM rounds WHERE number = ?", (number,))
        return Round.from_row(row) if row is not None else None

    def aggregated_rounds(self) -> list[tuple[Round, dict]]:
        """Every aggregated round with its row (aggregated_at, statistics), in order."""
        rows = self.store.select("SELECT * FROM rounds WHERE state = 'aggregated' ORDER BY number")
        return [(Round.from_row(row), row) for row in rows]

    def last_round_number(self) -> int:
        return self.store.select_one("SELECT MAX(number) AS n FROM rounds")["n"] or 0

    def insert_round(self, number: int, selected: list[str], plans: dict[str, ClientPlan], opened_at: float,
                     deadline: float) -> Round:
        row = {"number": number, "state": "open", "selected": selected,
               "plans": {c: p.to_json() for c, p in plans.items()}, "opened_at": opened_at, "deadline": deadline}
        self.store.insert("rounds", row)
        return Round(number, "open", list(selected), dict(plans), opened_at, deadline)

    def extend_round(self, r: Round, deadline: float, reason: str, extra: list[str],
                     extra_plans: dict[str, ClientPlan]) -> None:
        plans = r.plans | extra_plans
        self.store.update("rounds", {"number": r.number}, {
            "deadline": deadline, "extensions": r.extensions + 1, "extension_reason": reason,
            "selected": r.selected + extra, "plans": {c: p.to_json() for c, p in plans.items()}})

    def close_round(self, number: int, aggregated_at: float, statistics: dict) -> None:
        self.store.update("rounds", {"number": number}, {"state": "aggregated", "aggregated_at": aggregated_at,
                                                         "statistics": statistics})

    def round_statistics(self, number: int) -> dict:
        """The statistics an aggregated round recorded (round 0: the pooled head statistics' summary)."""
        return self.store.select_one("SELECT statistics FROM rounds WHERE number = ?", (number,))["statistics"]

    def last_anchors(self) -> dict:
        """The bound anchors after the last aggregated round (stage -> quantity -> anchor; {} before any)."""
        row = self.store.select_one("SELECT statistics FROM rounds WHERE state = 'aggregated' AND number > 0 "
                                    "ORDER BY number DESC LIMIT 1")
        return dict((row or {}).get("statistics") or {}).get("anchors", {})

    # --- clients -----------------------------------------------------------------------------------------
    def client(self, client_id: str) -> dict:
        return self.store.select_one("SELECT * FROM clients WHERE client_id = ?", (client_id,))

    def clients(self) -> list[dict]:
        """Every registered client's id and name (the caller orders them)."""
        return self.store.select("SELECT client_id, name FROM clients")

    def tiers(self) -> dict[str, tuple[dict, Tier]]:
        """client id -> (its id and name, its stored tier)."""
        rows = self.store.select("SELECT client_id, name, rank, caps FROM clients")
        return {r["client_id"]: ({"client_id": r["client_id"], "name": r["name"]}, Tier(r["rank"], **r["caps"]))
                for r in rows}

    # --- uploads -----------------------------------------------------------------------------------------
    def upload(self, number: int, client_id: str) -> dict | None:
        return self.store.select_one("SELECT * FROM uploads WHERE round = ? AND client_id = ?", (number, client_id))

    def uploads(self, number: int) -> list[dict]:
        return self.store.select("SELECT * FROM uploads WHERE round = ? ORDER BY received_at", (number,))

    def save_upload(self, row: dict, body: bytes, pruned_to: int | None) -> dict:
        """The blob at its path (from round, client and digest), then its row (and the client's lower rank after
        self-pruning) in one transaction; no blob without a row. Returns the row."""
        row = row | {"path": upload_path(row["round"], row["client_id"], row["sha256"])}
        self.store.write_blob(row["path"], body)
        try:
            with self.store.transaction():
                self.store.insert("uploads", row)
                if pruned_to is not None:
                    client = self.client(row["client_id"])
                    self.store.update("clients", {"client_id": row["client_id"]},
                                      {"pruned_rank": pruned_to, "rank": min(client["rank"], pruned_to)})
        except BaseException:
            self.store.delete_blob(row["path"])
            raise
        return row

    def upload_bytes(self, row: dict) -> bytes:
        return self.store.read_blob(row["path"])

    def bytes_down(self, number: int) -> int:
        """Adapter bytes served for a round, every download counted (a client that restarts downloads again)."""
        row = self.store.select_one("SELECT COALESCE(SUM(bytes), 0) AS total FROM downloads WHERE round = ?",
                                    (number,))
        return int(row["total"])

    def registered(self) -> list[dict]:
        """Every registered client's row as status shows it, in registration order."""
        return self.store.select("SELECT client_id, name, rank, requested_rank, pruned_rank, n_samples, registered_at "
                                 "FROM clients ORDER BY seq")

    def record_download(self, number: int, client_id: str, size: int, served_at: float) -> None:
        with self.store.transaction():
            self.store.insert("downloads", {"round": number, "client_id": client_id, "bytes": size,
                                            "served_at": served_at})

    # --- the server optimiser's state ---------------------------------------------------------------------
    def optimizer_state(self, version: int) -> dict:
        """The state saved with global version n ({} when none was)."""
        path = optimizer_path(version)
        return load_arrays(self.store.read_blob(path)) if self.store.blob_exists(path) else {}

    def save_optimizer_state(self, version: int, state: dict) -> None:
        """Written before version n is committed: a crash re-runs the step from version n-1's state."""
        self.store.write_blob(optimizer_path(version), save_arrays(state))
