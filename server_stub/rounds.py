"""The round lifecycle, independent of HTTP: registration, selection, uploads, deadlines, aggregation.

State machine (docs/PROTOCOL.md section 4): waiting -> open(n) -> aggregate(n) -> open(n+1) ... finished.
Every public method takes the coordinator's lock, so HTTP worker threads and the deadline
ticker see one consistent state. Every change is committed to the Store before it is reported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time

import numpy as np
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays

from edge_client.wire import LORA_A, LORA_B, Adapter, WireFormatError, decode, encode, meta_int, validate
from server_stub import liveness
from server_stub.aggregation import ClientResult, aggregate_statistics
from server_stub.aggregation.bounds import bound_influence, check_values
from server_stub.config import ServerConfig
from server_stub.errors import ApiError
from server_stub.init_adapter import start_global
from server_stub.head_round import HEAD_ROUND, check_statistics, initial_global, load_statistics
from server_stub.ranks import assign_rank
from server_stub.store import Store

log = logging.getLogger("hetlora.server")


def select_clients(client_ids: list[str], k: int, seed: int, round_number: int) -> list[str]:
    """Up to k of `client_ids` (all when k is 0 or >= their number), drawn with numpy PCG64 seeded by (seed, round)."""
    if not k or k >= len(client_ids):
        return list(client_ids)
    picked = np.random.default_rng([seed, round_number]).choice(len(client_ids), size=k, replace=False)
    return [client_ids[i] for i in sorted(picked)]


def client_key(client: dict) -> str:
    """What seeds and orders a client: its name when it gave one (stable across re-registrations and
    identical runs), else its id."""
    return client["name"] or client["client_id"]


def client_order(client: dict) -> tuple:
    """Named clients first, by name, then by id: registration order (a race) never matters."""
    return (client["name"] is None, client["name"] or "", client["client_id"])


def training_seed(seed: int, round_number: int, key: str) -> int:
    """The seed of one client's local round: sha256 of (run seed, round, client key), 32 bits."""
    digest = hashlib.sha256(json.dumps([seed, round_number, key]).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def update_digest(adapter: Adapter) -> str:
    """sha256 of an update's content, whatever order its safetensors header lists things in:
    the canonical meta JSON, then per tensor (sorted by wire name) its name, shape and float32 bytes."""
    tensors = {name + LORA_A: a for name, (a, _) in adapter.lora.items()}
    tensors |= {name + LORA_B: b for name, (_, b) in adapter.lora.items()}
    tensors |= adapter.dense
    h = hashlib.sha256(json.dumps(adapter.meta, sort_keys=True).encode())
    for name in sorted(tensors):
        t = np.ascontiguousarray(tensors[name], dtype=np.float32)
        h.update(f"\0{name}\0{list(t.shape)}\0".encode())
        h.update(t.tobytes())
    return h.hexdigest()


def _decode(body: bytes) -> Adapter:
    """wire.decode with its errors as 400 ApiErrors."""
    try:
        return decode(body)
    except WireFormatError as exc:
        raise ApiError(400, exc.code, str(exc)) from None


def _log_opened(row: dict | None) -> None:
    if row is not None:
        log.info("round %d open: selected %s", row["number"],
                 ", ".join(f"{c}@r{row['ranks'][c]}" for c in row["selected"]))


def jsonable(value):
    """numpy scalars/arrays (and containers of them) as plain JSON types; NaN and +-Inf as None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic)):
        return jsonable(value.tolist())
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


class Coordinator:
    """Runs the rounds of one federated run over a Store and a pure aggregation rule."""

    def __init__(self, config: ServerConfig, store: Store, rule, clock=time.time):
        self.config = config
        self.store = store
        self.rule = rule
        self.clock = clock
        self.lock = threading.RLock()
        self._cached_global: tuple[int, Adapter] | None = None
        self._closing: int | None = None  # the round being aggregated right now
        self.on_aggregated = lambda seconds: None  # told each aggregation's duration (server_stub.metrics)
        with self.lock:
            if self._global_row(0) is None and not config.head_round:
                self._commit_global(0, start_global(rule, config))
            with self.store.transaction():
                opened = self._open_next_round_if_ready()
            _log_opened(opened)
            self.tick()  # a restart may find the deadline passed or every upload already in

    # --- clients -------------------------------------------------------------------------------
    def register(self, profile: dict, requested_rank: int, n_samples: int, name: str | None = None) -> dict:
        if requested_rank < 1:
            raise ApiError(400, "bad_rank", f"requested_rank must be at least 1, got {requested_rank}")
        if n_samples < 0:
            raise ApiError(400, "bad_request", f"n_samples must be >= 0, got {n_samples}")
        rank = self._rank_for(profile, requested_rank, pruned_rank=None)
        client_id, token = "c-" + secrets.token_hex(6), secrets.token_urlsafe(32)
        with self.lock, self.store.transaction():
            self.store.insert("clients", {
                "client_id": client_id, "token_sha256": token_digest(token), "name": name, "profile": profile,
                "requested_rank": requested_rank, "rank": rank, "pruned_rank": None, "n_samples": n_samples,
                "registered_at": self.clock(),
            })
            opened = self._open_next_round_if_ready()
        log.info("registered %s (%s): requested rank %d -> rank %d, %d samples",
                 client_id, name or "unnamed", requested_rank, rank, n_samples)
        _log_opened(opened)
        return {"client_id": client_id, "token": token, "rank": rank, "run": self.config.run_config()}

    def authenticate(self, authorization: str | None) -> str:
        """The client id of an `Authorization: Bearer <token>` header value."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "missing_token", "send the header 'Authorization: Bearer <token>' with the token "
                                                 "from POST /v1/register")
        with self.lock:
            row = self.store.select_one("SELECT client_id FROM clients WHERE token_sha256 = ?",
                                        (token_digest(token.strip()),))
        if row is None:
            raise ApiError(401, "bad_token", "unknown token; register again with POST /v1/register")
        return row["client_id"]

    def report_profile(self, client_id: str, profile: dict, requested_rank: int | None = None) -> dict:
        """A fresh device profile: returns the rank for the next round the client is selected in."""
        if requested_rank is not None and requested_rank < 1:
            raise ApiError(400, "bad_rank", f"requested_rank must be at least 1, got {requested_rank}")
        with self.lock, self.store.transaction():
            client = self._client(client_id)
            requested = requested_rank or client["requested_rank"]
            rank = self._rank_for(profile, requested, client["pruned_rank"], previous_rank=client["rank"])
            self.store.update("clients", {"client_id": client_id},
                              {"profile": profile, "requested_rank": requested, "rank": rank})
        log.info("profile of %s updated: rank %d -> %d", client_id, client["rank"], rank)
        return {"client_id": client_id, "rank": rank}

    def _rank_for(self, profile: dict, requested_rank: int, pruned_rank: int | None,
                  previous_rank: int | None = None) -> int:
        rank = self.config.rule_rank(assign_rank(profile, requested_rank, self.config.ranks,
                                                 previous_rank=previous_rank, spec=self.config.spec))
        return min(rank, pruned_rank) if pruned_rank else rank

    def _client(self, client_id: str) -> dict:
        return self.store.select_one("SELECT * FROM clients WHERE client_id = ?", (client_id,))

    # --- rounds --------------------------------------------------------------------------------
    def round_for(self, client_id: str) -> dict:
        """The current round as one client sees it (GET /v1/round)."""
        with self.lock:
            liveness.seen(self.store, client_id)
            client = self._client(client_id)
            r = self._open_round()
            if r is not None:
                selected = client_id in r["selected"]
                return {
                    "round": r["number"], "state": "open", "deadline": r["deadline"], "selected": selected,
                    "stage": "head" if r["number"] == HEAD_ROUND and self.config.head_round else "lora",
                    "rank": r["ranks"][client_id] if selected else client["rank"],
                    "indices": r["indices"].get(client_id), "uploaded": self._upload(r["number"], client_id) is not None,
                    "seed": training_seed(self.config.seed, r["number"], client_key(client)),
                    "rounds": self.config.rounds, "global_version": r["number"] - 1,
                }
            last = self._last_round_number()
            finished = last >= self.config.rounds
            return {
                "round": last if finished else last + 1, "state": "finished" if finished else "waiting",
                "deadline": None, "selected": False, "rank": client["rank"], "indices": None, "uploaded": False,
                "rounds": self.config.rounds, "global_version": self._latest_global_version(),
            }

    def download(self, client_id: str, round_number: int) -> bytes:
        """The rule's client view of global version n-1 at the client's rank for round n (wire bytes)."""
        with self.lock:
            liveness.seen(self.store, client_id)
            r = self._require_open(round_number)
            self._require_selected(r, client_id)
            if self._is_head_round(round_number):
                raise ApiError(409, "head_round", "round 0 collects head statistics; there is no adapter to download")
            rank = r["ranks"][client_id]
            view = self.rule.client_view(self._global(round_number - 1), rank)
            meta = {"round": round_number, "client_id": client_id, "rank": rank,
                    "indices": r["indices"].get(client_id), "aggregator": self.config.aggregator,
                    "global_version": round_number - 1, "spec_fingerprint": self.config.spec.fingerprint}
            data = encode(Adapter(lora=view.lora, dense=view.dense, meta=meta))
            with self.store.transaction():
                self.store.insert("downloads", {"round": round_number, "client_id": client_id, "bytes": len(data),
                                                "served_at": self.clock()})
            return data

    def accept_upload(self, client_id: str, round_number: int, body: bytes) -> dict:
        """Validate and store one update; aggregate when it completes the round. Nothing is stored on error.

        The identical update again (same `update_digest`) is answered 200 even after its round closed,
        so a client may retry an upload whose reply it lost."""
        with self.lock:
            liveness.seen(self.store, client_id)
            previous = self._upload(round_number, client_id)
            if previous is not None and previous["sha256"] == self._digest(round_number, body):
                state = self.store.select_one("SELECT state FROM rounds WHERE number = ?", (round_number,))["state"]
                return self._upload_reply(previous, duplicate=True, round_state=state)
            r = self._require_open(round_number)
            self._require_selected(r, client_id)
            if previous is not None:
                raise ApiError(409, "duplicate_upload", f"round {round_number} already has a different update "
                               f"from {client_id} (sha256 {previous['sha256'][:12]}...); one update per round")
            if self._is_head_round(round_number):
                row = self._store_statistics(r, client_id, body)
            else:
                row = self._store_update(r, client_id, round_number, body)
            reply = self._upload_reply(row, duplicate=False, round_state="open")
            due = self._due_round()
        if due is not None:
            self._aggregate(due)
            reply["round_state"] = "aggregated"
        return reply

    def _store_update(self, r: dict, client_id: str, round_number: int, body: bytes) -> dict:
        """Under the lock: check one adapter upload and store it (blob, then row); returns the row."""
        adapter = _decode(body)
        digest = update_digest(adapter)
        assigned = r["ranks"][client_id]
        try:
            rank, effective_rank, n_samples = self._check_meta(adapter.meta, round_number, client_id, assigned)
            tensor_rank = validate(adapter, self.config.spec, max_rank=self.rule.upload_rank_limit(assigned))
            check_values(adapter)
        except WireFormatError as exc:
            raise ApiError(400, exc.code, str(exc)) from None
        self._check_ranks(r, client_id, adapter.meta, effective_rank, tensor_rank)

        path = f"uploads/r{round_number:04d}/{client_id}-{digest[:16]}.safetensors"
        self.store.write_blob(path, body)
        row = {"round": round_number, "client_id": client_id, "sha256": digest, "path": path, "rank": rank,
               "effective_rank": effective_rank, "n_samples": n_samples, "bytes": len(body),
               "received_at": self.clock()}
        try:
            with self.store.transaction():
                self.store.insert("uploads", row)
                if effective_rank < assigned:
                    client = self._client(client_id)
                    self.store.update("clients", {"client_id": client_id},
                                      {"pruned_rank": effective_rank, "rank": min(client["rank"], effective_rank)})
        except BaseException:  # no blob without a row
            self.store.delete_blob(path)
            raise
        uploaded = len(self._uploads(round_number))
        log.info("round %d: upload from %s accepted (rank %d, effective rank %d, %d samples); %d of %d in",
                 round_number, client_id, rank, effective_rank, n_samples, uploaded, len(r["selected"]))
        return row

    def _is_head_round(self, round_number: int) -> bool:
        return round_number == HEAD_ROUND and self.config.head_round

    def _digest(self, round_number: int, body: bytes) -> str:
        """What identifies an upload: the content digest of an adapter, the sha256 of statistics bytes."""
        return hashlib.sha256(body).hexdigest() if self._is_head_round(round_number) else update_digest(_decode(body))

    def _store_statistics(self, r: dict, client_id: str, body: bytes) -> dict:
        """Under the lock: check one round-0 statistics upload and store it (blob, then row); returns the row."""
        stats = check_statistics(self.config, client_id, body)
        digest = hashlib.sha256(body).hexdigest()
        path = f"uploads/r0000/{client_id}-{digest[:16]}.safetensors"
        self.store.write_blob(path, body)
        row = {"round": HEAD_ROUND, "client_id": client_id, "sha256": digest, "path": path, "rank": 0,
               "effective_rank": 0, "n_samples": stats.n_samples, "bytes": len(body), "received_at": self.clock()}
        try:
            with self.store.transaction():
                self.store.insert("uploads", row)
        except BaseException:  # no blob without a row
            self.store.delete_blob(path)
            raise
        log.info("round 0: head statistics from %s accepted (%d samples); %d of %d in", client_id, stats.n_samples,
                 len(self._uploads(HEAD_ROUND)), len(r["selected"]))
        return row

    def _check_meta(self, meta: dict, round_number: int, client_id: str, assigned: int) -> tuple[int, int, int]:
        if meta_int(meta, "round", minimum=1) != round_number:
            raise WireFormatError("bad_metadata", f"metadata round {meta['round']} does not match the URL round "
                                  f"{round_number}")
        if meta.get("client_id") != client_id:
            raise ApiError(400, "client_mismatch", f"metadata client_id {meta.get('client_id')!r} is not the client "
                           f"of this token ({client_id})")
        rank = meta_int(meta, "rank", minimum=1)
        effective_rank = meta_int(meta, "effective_rank", minimum=1)
        n_samples = meta_int(meta, "n_samples", minimum=1)
        if rank != assigned:
            raise ApiError(400, "rank_mismatch", f"metadata rank {rank} is not the rank {assigned} assigned for "
                           f"round {round_number}")
        return rank, effective_rank, n_samples

    def _check_ranks(self, r: dict, client_id: str, meta: dict, effective_rank: int, tensor_rank: int) -> None:
        assigned = r["ranks"][client_id]
        if tensor_rank != effective_rank:
            raise ApiError(400, "rank_mismatch", f"the tensors have rank {tensor_rank} but metadata effective_rank "
                           f"is {effective_rank}")
        if self.config.aggregator == "fedavg" and effective_rank != assigned:
            raise ApiError(400, "rank_mismatch", f"fedavg is homogeneous: upload rank {effective_rank} must equal "
                           f"the assigned rank {assigned}")
        expected = r["indices"].get(client_id)
        if expected is not None and meta.get("indices") != expected:
            raise ApiError(400, "wrong_indices", f"metadata indices {meta.get('indices')!r} are not the indices "
                           f"assigned for round {r['number']}: {expected}")

    def _upload_reply(self, row: dict, *, duplicate: bool, round_state: str) -> dict:
        client = self._client(row["client_id"])
        return {"accepted": True, "round": row["round"], "sha256": row["sha256"], "rank": row["rank"],
                "effective_rank": row["effective_rank"], "duplicate": duplicate, "next_rank": client["rank"],
                "round_state": round_state}

    def tick(self) -> None:
        """At the deadline: aggregate with >= min_clients uploads, else extend the deadline and say why."""
        with self.lock:
            due = self._due_round()
        if due is not None:
            self._aggregate(due)

    def _due_round(self) -> dict | None:
        """Under the lock: the open round, marked closing, when it should aggregate now; else None.

        Extends the deadline (and records why) when it passed with fewer than min_clients uploads."""
        r = self._open_round()
        if r is None or self._closing is not None:
            return None
        uploaded = {u["client_id"] for u in self._uploads(r["number"])}
        dropped = liveness.dropped(self.store, r["number"])
        silent = [c for c in r["selected"] if c not in uploaded and c not in dropped]
        required = min(self.config.min_clients, len(r["selected"]))
        if not silent and (not dropped or len(uploaded) >= required):
            return self._mark_closing(r)
        now = self.clock()
        if now < r["deadline"]:
            return None
        with self.store.transaction():
            liveness.drop(self.store, r["number"], silent)
        if silent:
            log.warning("round %d: dropped %s (no upload by the deadline)", r["number"], ", ".join(silent))
        if len(uploaded) >= required:
            log.info("round %d: deadline reached with %d of %d uploads; aggregating",
                     r["number"], len(uploaded), len(r["selected"]))
            return self._mark_closing(r)
        extra = liveness.replacements(self.store, r, required - len(uploaded))
        ranks, indices = self._assign(extra, r["number"])
        reason = (f"only {len(uploaded)} of the {required} required uploads arrived by the deadline"
                  + (f"; dropped {len(dropped) + len(silent)} silent client(s)" if dropped or silent else "")
                  + (f"; selected {len(extra)} replacement(s)" if extra else "")
                  + f"; extended by {self.config.round_deadline:g} s")
        with self.store.transaction():
            self.store.update("rounds", {"number": r["number"]}, {
                "deadline": now + self.config.round_deadline, "extensions": r["extensions"] + 1,
                "extension_reason": reason, "selected": r["selected"] + extra, "ranks": r["ranks"] | ranks,
                "indices": r["indices"] | indices})
        log.warning("round %d: %s", r["number"], reason)
        return None

    def _mark_closing(self, r: dict) -> dict:
        self._closing = r["number"]
        return r

    def _aggregate(self, r: dict) -> None:
        """Aggregate a round marked closing. The rule runs outside the lock, so other requests are answered
        meanwhile (uploads for this round are refused); then the new global blob is written and, in one
        transaction, its row, the closed round and the next round are committed."""
        number = r["number"]
        try:
            with self.lock:
                uploads = {u["client_id"]: u for u in self._uploads(number)}
            order = [c for c in r["selected"] if c in uploads]
            started = time.perf_counter()
            new_global, statistics = self._combine(number, r, [uploads[c] for c in order])
            self.on_aggregated(time.perf_counter() - started)
            path, digest = self._write_global(number, new_global)
            with self.lock:
                with self.store.transaction():
                    self.store.insert("globals", {"version": number, "path": path, "sha256": digest,
                                                  "created_at": self.clock()})
                    self.store.update("rounds", {"number": number}, {"state": "aggregated",
                                                                     "aggregated_at": self.clock(),
                                                                     "statistics": statistics})
                    opened = self._open_next_round_if_ready()
                self._cached_global = (number, new_global)
        finally:
            with self.lock:
                self._closing = None
        log.info("round %d aggregated (%s) from %s: %s", number, self.config.aggregator,
                 ", ".join(f"{c}@r{uploads[c]['effective_rank']}" for c in order), json.dumps(statistics))
        if number >= self.config.rounds:
            log.info("all %d rounds done; run finished", self.config.rounds)
        _log_opened(opened)

    def _combine(self, number: int, r: dict, uploads: list[dict]) -> tuple[Adapter, dict]:
        """The new global and its statistics from a closing round's uploads (in selection order)."""
        if self._is_head_round(number):
            statistics = [load_statistics(self.config, self.store.read_blob(u["path"])) for u in uploads]
            new_global, summary = initial_global(self.rule, self.config, statistics)
            return new_global, jsonable(summary)
        with self.lock:
            previous = self._global(number - 1)
        results = [ClientResult(adapter=decode(self.store.read_blob(u["path"])), n_samples=u["n_samples"],
                                indices=tuple(r["indices"][u["client_id"]]) if r["indices"].get(u["client_id"])
                                is not None else None)
                   for u in uploads]
        results, clipped = bound_influence(previous, results)
        new_global = self.rule.aggregate(previous, results)
        if self.config.server_opt.name != "none":
            new_global = self._optimizer_step(number, previous, new_global)
        statistics = aggregate_statistics(new_global, results)
        statistics["clipped"] = {uploads[k]["client_id"]: what for k, what in clipped.items()}
        return new_global, jsonable(statistics)

    def _optimizer_step(self, number: int, previous: Adapter, aggregated: Adapter) -> Adapter:
        """The server optimiser's step; its state for version n is written (atomically) before global n is
        committed, so a crash in between re-runs the step from the state of version n-1."""
        state_path = f"optimizer/v{number - 1:04d}.safetensors"
        state = load_arrays(self.store.read_blob(state_path)) if self.store.blob_exists(state_path) else {}
        new_global, new_state = self.config.server_opt.step(previous, aggregated, state,
                                                            product_space=self.rule.name == "hlora")
        self.store.write_blob(f"optimizer/v{number:04d}.safetensors", save_arrays(new_state))
        return new_global

    def _open_next_round_if_ready(self) -> dict | None:
        """Inside a transaction: open the next round when none is open, rounds remain and enough clients
        registered: round 0 (head statistics, every registered client) first when the run has one, then
        round last+1 with `clients_per_round` selected. Returns the new round's row (None when none opened)."""
        if self._open_round() is not None:
            return None
        gone = liveness.absent(self.store)
        clients = sorted((c for c in self.store.select("SELECT client_id, name FROM clients") if c["client_id"] not in gone),
                         key=client_order)
        head_first = self.config.head_round and self._global_row(0) is None
        number = HEAD_ROUND if head_first else self._last_round_number() + 1
        needed = max(self.config.head_clients, self.config.min_clients) if head_first else self.config.min_clients
        if number > self.config.rounds or len(clients) < needed:
            return None
        k = 0 if head_first else self.config.clients_per_round
        selected = select_clients([c["client_id"] for c in clients], k, self.config.seed, number)
        ranks, indices = self._assign(selected, number)
        now = self.clock()
        row = {"number": number, "state": "open", "selected": selected, "ranks": ranks, "indices": indices,
               "opened_at": now, "deadline": now + self.config.round_deadline}
        self.store.insert("rounds", row)
        return row

    def _assign(self, client_ids: list[str], number: int) -> tuple[dict, dict]:
        """The round's rank per client (its current rank) and, for plora, its indices (drawn from the
        client's key; none in the head round)."""
        rows = {c["client_id"]: c for c in self.store.select("SELECT client_id, name, rank FROM clients")}
        ranks = {c: rows[c]["rank"] for c in client_ids}
        indices = {}
        for c in client_ids if not self._is_head_round(number) else ():
            assigned = self.rule.assign_indices(global_rank=self.config.global_rank, rank=ranks[c],
                                                round_number=number, client_id=client_key(rows[c]),
                                                seed=self.config.seed)
            if assigned is not None:
                indices[c] = [int(i) for i in assigned]
        return ranks, indices

    def _require_open(self, round_number: int) -> dict:
        r = self._open_round()
        if r is not None and r["number"] == round_number:
            if self._closing == round_number:
                raise ApiError(409, "round_closed", f"round {round_number} is closed: it is being aggregated now",
                               current_round=round_number)
            return r
        last = self._last_round_number()
        if r is not None:
            current, state = r["number"], "open"
        elif last >= self.config.rounds:
            current, state = last, "finished"
        else:
            current, state = last + 1, "waiting for clients"
        if 1 <= round_number <= (current - 1 if r is not None else last):
            raise ApiError(409, "round_closed", f"round {round_number} is closed (already aggregated); the current "
                           f"round is {current} ({state})", current_round=current)
        raise ApiError(409, "round_not_open", f"round {round_number} is not open; the current round is {current} "
                       f"({state})", current_round=current)

    @staticmethod
    def _require_selected(r: dict, client_id: str) -> None:
        if client_id not in r["selected"]:
            raise ApiError(403, "not_selected", f"{client_id} is not selected for round {r['number']}; "
                           "poll GET /v1/round and wait for a later round")

    def _open_round(self) -> dict | None:
        return self.store.select_one("SELECT * FROM rounds WHERE state = 'open'")

    def _last_round_number(self) -> int:
        row = self.store.select_one("SELECT MAX(number) AS n FROM rounds")
        return row["n"] or 0

    def _upload(self, round_number: int, client_id: str) -> dict | None:
        return self.store.select_one("SELECT * FROM uploads WHERE round = ? AND client_id = ?", (round_number, client_id))

    def _uploads(self, round_number: int) -> list[dict]:
        return self.store.select("SELECT * FROM uploads WHERE round = ? ORDER BY received_at", (round_number,))

    # --- global versions -----------------------------------------------------------------------
    def global_bytes(self, version: int | None = None) -> bytes:
        """The wire bytes of a global version (the latest when None)."""
        with self.lock:
            version = self._latest_global_version() if version is None else version
            if version is None:
                raise ApiError(404, "no_such_version", "there is no global adapter yet: round 0 (head statistics) "
                               "has not finished")
            row = self._global_row(version)
            if row is None:
                raise ApiError(404, "no_such_version", f"global version {version} does not exist; the latest is "
                               f"{self._latest_global_version()}")
            return self.store.read_blob(row["path"])

    def _global(self, version: int) -> Adapter:
        if self._cached_global is None or self._cached_global[0] != version:
            self._cached_global = (version, decode(self.store.read_blob(self._global_row(version)["path"])))
        return self._cached_global[1]

    def _global_row(self, version: int) -> dict | None:
        return self.store.select_one("SELECT * FROM globals WHERE version = ?", (version,))

    def _latest_global_version(self) -> int:
        return self.store.select_one("SELECT MAX(version) AS v FROM globals")["v"]

    def _write_global(self, version: int, adapter: Adapter) -> tuple[str, str]:
        meta = {"global_version": version, "round": version, "rank": adapter.rank,
                "aggregator": self.config.aggregator, "spec_fingerprint": self.config.spec.fingerprint}
        data = encode(Adapter(lora=adapter.lora, dense=adapter.dense, meta=meta))
        path = f"globals/v{version:04d}.safetensors"
        self.store.write_blob(path, data)
        return path, hashlib.sha256(data).hexdigest()

    def _commit_global(self, version: int, adapter: Adapter) -> None:
        path, digest = self._write_global(version, adapter)
        with self.store.transaction():
            self.store.insert("globals", {"version": version, "path": path, "sha256": digest, "created_at": self.clock()})

    # --- status --------------------------------------------------------------------------------
    def status(self) -> dict:
        with self.lock:
            r = self._open_round()
            last = self._last_round_number()
            finished = r is None and last >= self.config.rounds
            if r is None and not finished:
                round_info = {"number": last + 1, "state": "waiting"}
            else:
                shown = r or self.store.select_one("SELECT * FROM rounds WHERE number = ?", (last,))
                round_info = {k: shown[k] for k in ("number", "state", "opened_at", "deadline", "selected", "ranks",
                                                    "indices", "extensions", "extension_reason")}
                round_info["uploads"] = [u["client_id"] for u in self._uploads(shown["number"])]
                round_info["dropped"] = liveness.dropped(self.store, shown["number"])
                round_info["aggregating"] = self._closing == shown["number"]
            clients = self.store.select("SELECT client_id, name, rank, requested_rank, pruned_rank, n_samples, "
                                        "registered_at FROM clients ORDER BY seq")
            return {"round": round_info, "rounds": self.config.rounds, "finished": finished,
                    "aggregator": self.config.aggregator, "global_version": self._latest_global_version(),
                    "clients": clients, "history": self._history(), "run": self.config.run_config()}

    def _bytes_down(self, round_number: int) -> int:
        """Adapter bytes served for a round, every download counted (a client that restarts downloads again)."""
        row = self.store.select_one("SELECT COALESCE(SUM(bytes), 0) AS total FROM downloads WHERE round = ?",
                                    (round_number,))
        return int(row["total"])

    def _history(self) -> list[dict]:
        history = []
        for r in self.store.select("SELECT * FROM rounds WHERE state = 'aggregated' ORDER BY number"):
            uploads = self._uploads(r["number"])
            history.append({
                "round": r["number"], "opened_at": r["opened_at"], "aggregated_at": r["aggregated_at"],
                "selected": r["selected"], "clients": [u["client_id"] for u in uploads],
                "dropped": liveness.dropped(self.store, r["number"]),
                "ranks": r["ranks"], "effective_ranks": {u["client_id"]: u["effective_rank"] for u in uploads},
                "n_samples": {u["client_id"]: u["n_samples"] for u in uploads},
                "bytes_up": sum(u["bytes"] for u in uploads), "bytes_down": self._bytes_down(r["number"]),
                "extensions": r["extensions"], "extension_reason": r["extension_reason"],
                "statistics": jsonable(r["statistics"]),  # rows stored before NaN was mapped to None
            })
        return history
