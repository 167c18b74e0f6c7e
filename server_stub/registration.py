"""Who the clients are: registration (with the client's tier), bearer-token authentication, profile reports.

A client's tier (rank and batch / sequence caps) is stored with it; the rule's configure step turns it into
the client's plan when a round opens. The caller passes the coordinator's lock and a function that opens
the next round when enough clients registered.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable

from hetlora.protocol.plan import Tier
from hetlora.engine.config import ServerConfig
from hetlora.engine.errors import Conflict, Unauthenticated
from hetlora.engine.registration import check_registration, check_requested_rank
from server_stub.run_store import Round, RunStore
from hetlora.engine.tiers import client_tier

log = logging.getLogger("hetlora.server")


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Registration:
    def __init__(self, config: ServerConfig, runs: RunStore, rule, lock, clock,
                 open_next_round: Callable[[], Round | None]):
        self.config, self.runs, self.rule, self.lock, self.clock = config, runs, rule, lock, clock
        self.store = runs.store
        self.open_next_round = open_next_round

    def register(self, profile: dict, requested_rank: int, n_samples: int, name: str | None = None,
                 unique_name: bool = False) -> tuple[dict, Round | None]:
        """A new client (id, token, the rank it trains at, the run config) and the round its arrival opened.
        `unique_name` (an allowlist is on): a name registers once, a second registration is 409 `name_taken`."""
        check_registration(self.config, name, profile, requested_rank, n_samples)
        tier = self._tier(profile, requested_rank, pruned_rank=None)
        client_id, token = "c-" + secrets.token_hex(6), secrets.token_urlsafe(32)
        with self.lock, self.store.transaction():
            if unique_name and self.store.select_one("SELECT client_id FROM clients WHERE name = ?", (name,)):
                raise Conflict("name_taken", f"the name {name!r} is already registered; each allowed name "
                               "registers once (resume with the client's --state-dir, or ask the operator)")
            self.store.insert("clients", {
                "client_id": client_id, "token_sha256": token_digest(token), "name": name, "profile": profile,
                "requested_rank": requested_rank, "rank": tier.rank, "caps": caps(tier), "pruned_rank": None,
                "n_samples": n_samples, "registered_at": self.clock(),
            })
            opened = self.open_next_round()
        rank = self.rule.planned_rank(tier.rank, self.config.global_rank)
        log.info("registered %s (%s): requested rank %d -> rank %d, %d samples",
                 client_id, name or "unnamed", requested_rank, rank, n_samples)
        return {"client_id": client_id, "token": token, "rank": rank, "run": self.config.run_config()}, opened

    def authenticate(self, authorization: str | None) -> str:
        """The client id of an `Authorization: Bearer <token>` header value."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("missing_token", "send the header 'Authorization: Bearer <token>' with the token "
                                                 "from POST /v1/register")
        with self.lock:
            row = self.store.select_one("SELECT client_id FROM clients WHERE token_sha256 = ?",
                                        (token_digest(token.strip()),))
        if row is None:
            raise Unauthenticated("bad_token", "unknown token; register again with POST /v1/register")
        return row["client_id"]

    def report_profile(self, client_id: str, profile: dict, requested_rank: int | None = None) -> dict:
        """A fresh device profile: returns the rank for the next round the client is selected in."""
        if requested_rank is not None:
            check_requested_rank(requested_rank)
        with self.lock, self.store.transaction():
            client = self.runs.client(client_id)
            requested = requested_rank or client["requested_rank"]
            tier = self._tier(profile, requested, client["pruned_rank"], previous_rank=client["rank"])
            self.store.update("clients", {"client_id": client_id},
                              {"profile": profile, "requested_rank": requested, "rank": tier.rank, "caps": caps(tier)})
        rank = self.rule.planned_rank(tier.rank, self.config.global_rank)
        log.info("profile of %s updated: rank %d -> %d", client_id, client["rank"], rank)
        return {"client_id": client_id, "rank": rank}

    def _tier(self, profile: dict, requested_rank: int, pruned_rank: int | None,
              previous_rank: int | None = None) -> Tier:
        return client_tier(self.config, profile, requested_rank, pruned_rank, previous_rank)


def caps(tier: Tier) -> dict:
    """A tier's batch and sequence caps and activation checkpointing, as stored with the client (its rank has a
    column of its own)."""
    return {"batch_size": tier.batch_size, "seq_len": tier.seq_len,
            "activation_checkpointing": tier.activation_checkpointing}
