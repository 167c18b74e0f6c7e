"""The client's durable state in its state directory, so a restart continues where it stopped.

  state.json            identity (server URL, client id, token), run config, rank,
                        the last round uploaded
  pending.safetensors   a trained update (or round-0 head statistics) not yet acknowledged, with its round
                        in the metadata: after a crash it is uploaded as is, never retrained
  rejected/             updates the server refused as invalid (400), kept for inspection, never re-sent
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hetlora.protocol import atomic
from hetlora.protocol.wire import WireFormatError, read_header
from hetlora.errors import UserError

STATE_FILE = "state.json"
PENDING_FILE = "pending.safetensors"
# What a new run must share with the saved one for the loaded model, data and trainer to serve it unchanged.
SAME_RUN_KEYS = ("task", "spec_fingerprint", "model_hash", "labels", "pooling", "lora_alpha")


def run_change(old: dict, new: dict) -> str | None:
    """The run-config keys that differ between `old` and `new` and that this client cannot follow (None: none)."""
    return ", ".join(key for key in SAME_RUN_KEYS if old.get(key) != new.get(key)) or None


@dataclass
class ClientState:
    server: str
    client_id: str | None = None
    token: str | None = None
    rank: int | None = None
    run: dict = field(default_factory=dict)
    last_uploaded_round: int = -1  # round 0 is the head-statistics round

    @property
    def registered(self) -> bool:
        return bool(self.client_id and self.token)


class StateDir:
    """Reads and writes ClientState and the pending upload atomically."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def load(self, server: str) -> ClientState:
        """The saved state, or a fresh one for `server`. A state of another server is refused."""
        file = self.path / STATE_FILE
        if not file.exists():
            return ClientState(server=server)
        try:
            state = ClientState(**json.loads(file.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise UserError(f"{file} is damaged ({exc}); move it away to register as a new client") from None
        if state.server.rstrip("/") != server.rstrip("/"):
            raise UserError(f"{self.path} belongs to server {state.server}, not {server}; "
                            "use another --state-dir for another server")
        return state

    def save(self, state: ClientState) -> None:
        atomic.write_json(self.path / STATE_FILE, asdict(state))

    def forget(self, state: ClientState) -> None:
        """Drop the identity and progress of a run the server no longer knows (and its pending upload)."""
        state.client_id = state.token = state.rank = None
        state.last_uploaded_round = -1
        self.clear_pending()
        self.save(state)

    def save_pending(self, data: bytes) -> None:
        atomic.write_bytes(self.path / PENDING_FILE, data)

    def pending(self, round_number: int) -> bytes | None:
        """The saved update for `round_number`, if one is waiting; stale or damaged ones are dropped."""
        file = self.path / PENDING_FILE
        if not file.exists():
            return None
        data = file.read_bytes()
        try:
            if json.loads(read_header(data)["__metadata__"]["meta"]).get("round") == round_number:
                return data
        except (WireFormatError, KeyError, TypeError, AttributeError, json.JSONDecodeError):
            pass
        file.unlink()
        return None

    def reject_pending(self, round_number: int, code: str) -> Path:
        """Move the pending update to rejected/round-NNNN-<code>.safetensors (atomic rename); return its path."""
        target = self.path / "rejected" / f"round-{round_number:04d}-{''.join(c for c in code if c.isalnum() or c == '_')}.safetensors"
        target.parent.mkdir(exist_ok=True)
        (self.path / PENDING_FILE).replace(target)
        return target

    def clear_pending(self) -> None:
        (self.path / PENDING_FILE).unlink(missing_ok=True)
