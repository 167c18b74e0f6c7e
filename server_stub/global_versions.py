"""The global adapter's versions: version n is the aggregate of round n (version 0: the initial global).

Each is a wire-format blob (`globals/vNNNN.safetensors`, written atomically) plus a `globals` row; the
latest one read is kept decoded in memory. The caller holds the coordinator's lock.
"""

from __future__ import annotations

import hashlib

from hetlora.protocol.wire import Adapter, decode, encode
from hetlora.engine.errors import NotFound
from server_stub.store import Store


class GlobalVersions:
    def __init__(self, store: Store, clock):
        self.store = store
        self.clock = clock
        self._cached: tuple[int, Adapter] | None = None

    def row(self, version: int) -> dict | None:
        return self.store.select_one("SELECT * FROM globals WHERE version = ?", (version,))

    def latest_version(self) -> int | None:
        return self.store.select_one("SELECT MAX(version) AS v FROM globals")["v"]

    def adapter(self, version: int) -> Adapter:
        if self._cached is None or self._cached[0] != version:
            self._cached = (version, decode(self.store.read_blob(self.row(version)["path"])))
        return self._cached[1]

    def wire_bytes(self, version: int | None = None) -> bytes:
        """The wire bytes of a global version (the latest when None); NotFound when there is none."""
        version = self.latest_version() if version is None else version
        if version is None:
            raise NotFound("no_such_version", "there is no global adapter yet: round 0 (head statistics) "
                           "has not finished")
        row = self.row(version)
        if row is None:
            raise NotFound("no_such_version", f"global version {version} does not exist; the latest is "
                           f"{self.latest_version()}")
        return self.store.read_blob(row["path"])

    def write(self, version: int, adapter: Adapter) -> dict:
        """Write the blob of version `version` (an adapter with its metadata: hetlora.engine.combine) and keep it
        decoded (the next round starts from it once the caller committed the row); returns its `globals` row (for
        the caller's transaction)."""
        data = encode(adapter)
        path = f"globals/v{version:04d}.safetensors"
        self.store.write_blob(path, data)
        self._cached = (version, adapter)
        return {"version": version, "path": path, "sha256": hashlib.sha256(data).hexdigest(),
                "created_at": self.clock()}

    def commit(self, version: int, adapter: Adapter) -> None:
        """Write and commit a version on its own (the initial global)."""
        row = self.write(version, adapter)
        with self.store.transaction():
            self.store.insert("globals", row)
