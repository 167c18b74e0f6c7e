"""What the HTTP coordinator keeps of a round: each accepted upload stored (blob, then row) and kept decoded until
the round closes, then the round's uploads combined (hetlora.engine.combine); round 0's statistics give the head.

An upload is decoded once, when the coordinator receives it (hetlora.engine.uploads.receive), and checked against its
plan (hetlora.engine.uploads.take); the decoded object is what is digested and, kept in memory until its round
closes, what the rule combines. Only uploads stored before a restart are decoded again from their blobs (once each).
"""

from __future__ import annotations

import logging

from hetlora.protocol.head_stats import HeadStatistics
from hetlora.protocol.wire import Adapter
from hetlora.engine.aggregation import ClientResult
from hetlora.engine.combine import combine, head_global
from hetlora.engine.config import ServerConfig
from hetlora.engine.errors import Conflict
from hetlora.engine.head_round import load_statistics
from hetlora.engine.uploads import Update, decode_update
from server_stub.run_store import Round, RunStore

log = logging.getLogger("hetlora.server")


class RoundState:
    """The coordinator's accepted uploads over its RunStore, stored and kept until their round combines them (the
    caller holds the lock where it says)."""

    def __init__(self, config: ServerConfig, runs: RunStore, clock):
        self.config, self.runs, self.clock = config, runs, clock
        # (round, client) -> its decoded, checked upload, until the round combines it
        self._taken: dict[tuple[int, str], ClientResult | HeadStatistics] = {}

    def statistics_round(self, number: int) -> bool:
        return self.config.stage(number) == "head-statistics"

    def require_download(self, number: int) -> None:
        """Round 0 has nothing to download (Conflict `head_round`)."""
        if self.statistics_round(number):
            raise Conflict("head_round", "round 0 collects head statistics; there is no adapter to download")

    def keep(self, r: Round, client_id: str, body: bytes, update: Update) -> dict:
        """Under the lock: store an upload checked against round r's plan (blob, then row; a self-pruned rank with
        it) and keep it decoded for the combine step. Returns the row."""
        checked = update.checked
        row = self.runs.save_upload({
            "round": r.number, "client_id": client_id, "sha256": update.digest, "rank": checked.rank,
            "effective_rank": checked.effective_rank, "n_samples": checked.n_samples, "bytes": len(body),
            "received_at": self.clock(), "energy": checked.energy}, body, checked.pruned_rank)
        self._taken[(r.number, client_id)] = update.result
        kind = "head statistics" if self.statistics_round(r.number) else \
            f"upload (rank {checked.rank}, effective rank {checked.effective_rank})"
        log.info("round %d: %s from %s accepted (%d samples); %d of %d in", r.number, kind, client_id,
                 checked.n_samples, len(self.runs.uploads(r.number)), len(r.selected))
        return row

    def combine(self, rule, r: Round, uploads: list[dict], previous: Adapter | None,
                anchors: dict) -> tuple[Adapter, dict]:
        """A closing round's new global and JSON-ready statistics from its uploads in selection order by `rule` (outside
        the lock; `previous` and `anchors` read under it). A LoRA round's optimiser state is saved before returning."""
        names = [u["client_id"] for u in uploads]
        taken = [self._taken.pop((r.number, c), None) for c in names]
        if self.statistics_round(r.number):
            statistics = [t or load_statistics(self.config, self.runs.upload_bytes(u)) for t, u in zip(taken, uploads)]
            return head_global(rule, self.config, names, statistics)
        plans = [r.plans[c] for c in names]
        results = [t or ClientResult(decode_update(self.config, self.runs.upload_bytes(u)), u["n_samples"],
                                     plan.indices) for t, u, plan in zip(taken, uploads, plans)]
        combined = combine(rule, self.config, r.number, previous, names, results, plans, anchors,
                           self.runs.optimizer_state(r.number - 1))
        if self.config.server_opt.name != "none" and self.config.stage(r.number) == "lora":
            self.runs.save_optimizer_state(r.number, combined.optimizer_state)
        return combined.new_global, combined.statistics
