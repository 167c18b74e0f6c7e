"""The round state machine, independent of HTTP: open a round with each selected client's plan, take uploads,
close it at the deadline or when every upload is in, aggregate, open the next.

States (docs/PROTOCOL.md section 4): waiting -> open(n) -> aggregate(n) -> open(n+1) ... finished.
Every public method takes the coordinator's lock, so HTTP worker threads and the deadline ticker see one
consistent state. Every change is committed to the Store before it is reported. Registration, the upload
checks, the global versions and the status live in their own modules; this one sequences them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time

from hetlora.protocol.energy import energy_of
from hetlora.protocol.plan import Tier
from hetlora.protocol.head_stats import TENSORS as HEAD_TENSORS
from hetlora.protocol.wire import Adapter, WireFormatError, decode, encode, read_header, spec_tensors
from server_stub import history, liveness, queries
from server_stub.combine import combine_round
from hetlora.engine.config import ServerConfig
from hetlora.engine.errors import Conflict, Invalid, NotSelected
from server_stub.global_versions import GlobalVersions, client_download
from hetlora.engine.head_round import HEAD_ROUND, check_statistics
from server_stub.registration import Registration
from hetlora.engine.selection import client_key, client_order, select_clients
from server_stub.store import Store
from hetlora.engine.upload_checks import check_update, update_digest

log = logging.getLogger("hetlora.server")


def _decode(body: bytes, max_tensors: int) -> Adapter:
    """wire.decode (the header limited to `max_tensors` before it is parsed) with its errors as Invalid."""
    try:
        return decode(body, max_tensors=max_tensors)
    except WireFormatError as exc:
        raise Invalid(exc.code, str(exc)) from None


def rank_counts(ranks: list[int]) -> str:
    """`r4 x3, r8 x1`: how many clients train (or uploaded) at each rank, for a log line of bounded length."""
    return ", ".join(f"r{r} x{ranks.count(r)}" for r in sorted(set(ranks)))


def _log_opened(row: dict | None) -> None:
    if row is not None:
        log.info("round %d open: %d clients selected (%s)", row["number"], len(row["selected"]),
                 rank_counts([row["plans"][c]["rank"] for c in row["selected"]]))
        log.debug("round %d selected %s", row["number"],
                  ", ".join(f"{c}@r{row['plans'][c]['rank']}" for c in row["selected"]))


class Coordinator:
    """Runs the rounds of one federated run over a Store and a pure aggregation rule."""

    def __init__(self, config: ServerConfig, store: Store, rule, clock=time.time, on_finished=None):
        self.config = config
        self.on_finished = on_finished  # called with the last global's wire bytes when the run finishes
        self.store = store
        self.rule = rule
        self.clock = clock
        self.lock = threading.RLock()
        self.globals = GlobalVersions(store, config, clock)
        self.registration = Registration(config, store, rule, self.lock, clock, self._open_next_round_if_ready)
        self._closing: int | None = None  # the round being aggregated right now
        with self.lock:
            if self.globals.row(0) is None and not config.head_round:
                self.globals.commit(0, rule.init_global(config.spec, config.global_rank, config.seed))
            with self.store.transaction():
                opened = self._open_next_round_if_ready()
            _log_opened(opened)
            self.tick()  # a restart may find the deadline passed or every upload already in

    # --- clients (server_stub.registration) ------------------------------------------------------
    def register(self, profile: dict, requested_rank: int, n_samples: int, name: str | None = None,
                 unique_name: bool = False) -> dict:
        reply, opened = self.registration.register(profile, requested_rank, n_samples, name, unique_name)
        _log_opened(opened)
        return reply

    def authenticate(self, authorization: str | None) -> str:
        return self.registration.authenticate(authorization)

    def report_profile(self, client_id: str, profile: dict, requested_rank: int | None = None) -> dict:
        return self.registration.report_profile(client_id, profile, requested_rank)

    # --- one client's view of the round -----------------------------------------------------------
    def round_for(self, client_id: str) -> dict:
        """The current round as one client sees it (GET /v1/round), with its plan when it is selected."""
        with self.lock:
            liveness.seen(self.store, client_id)
            client = queries.client(self.store, client_id)
            next_rank = self.rule.planned_rank(client["rank"], self.config.global_rank)
            r = queries.open_round(self.store)
            if r is not None:
                plan = r["plans"].get(client_id)
                return {
                    "round": r["number"], "state": "open", "deadline": r["deadline"], "selected": plan is not None,
                    "stage": self.config.stage(r["number"]), "plan": plan,
                    "rank": plan["rank"] if plan else next_rank, "indices": plan["indices"] if plan else None,
                    "seed": plan["training"]["seed"] if plan else None,
                    "uploaded": queries.upload(self.store, r["number"], client_id) is not None,
                    "rounds": self.config.last_round, "global_version": r["number"] - 1,
                }
            last = queries.last_round_number(self.store)
            finished = last >= self.config.last_round
            return {
                "round": last if finished else last + 1, "state": "finished" if finished else "waiting",
                "deadline": None, "selected": False, "plan": None, "rank": next_rank, "indices": None,
                "uploaded": False, "rounds": self.config.last_round, "global_version": self.globals.latest_version(),
            }

    def download(self, client_id: str, round_number: int) -> bytes:
        """The rule's client view of global version n-1 at the client's planned rank for round n (wire bytes)."""
        with self.lock:
            liveness.seen(self.store, client_id)
            r = self._require_open(round_number)
            self._require_selected(r, client_id)
            if self.config.stage(round_number) == "head-statistics":
                raise Conflict("head_round", "round 0 collects head statistics; there is no adapter to download")
            plan = r["plans"][client_id]
            data = encode(client_download(self.rule, self.globals.adapter(round_number - 1), plan, client_id,
                                          self.config))
            with self.store.transaction():
                self.store.insert("downloads", {"round": round_number, "client_id": client_id, "bytes": len(data),
                                                "served_at": self.clock()})
            return data

    def global_bytes(self, version: int | None = None) -> bytes:
        """The wire bytes of a global version (the latest when None)."""
        with self.lock:
            return self.globals.wire_bytes(version)

    def status(self) -> dict:
        with self.lock:
            round_info, finished = history.current_round(self.store, self.config.last_round, self._closing)
            clients = history.clients(self.store, lambda rank: self.rule.planned_rank(rank, self.config.global_rank))
            return {"round": round_info, "rounds": self.config.last_round, "finished": finished,
                    "aggregator": self.config.aggregator, "global_version": self.globals.latest_version(),
                    "clients": clients, "history": history.history(self.store, self.config.stage), "run": self.config.run_config()}

    # --- uploads ---------------------------------------------------------------------------------
    def accept_upload(self, client_id: str, round_number: int, body: bytes) -> dict:
        """Check and store one update; aggregate when it completes the round. Nothing is stored on error.

        The identical update again (same `update_digest`) is answered 200 even after its round closed,
        so a client may retry an upload whose reply it lost. The header's size is checked before the lock is
        taken, so a header bomb is refused without holding other clients."""
        self._check_header(round_number, body)
        with self.lock:
            liveness.seen(self.store, client_id)
            previous = queries.upload(self.store, round_number, client_id)
            if previous is not None and previous["sha256"] == self._digest(round_number, body):
                state = self.store.select_one("SELECT state FROM rounds WHERE number = ?", (round_number,))["state"]
                return self._upload_reply(previous, duplicate=True, round_state=state)
            r = self._require_open(round_number)
            self._require_selected(r, client_id)
            if previous is not None:
                raise Conflict("duplicate_upload", f"round {round_number} already has a different update "
                               f"from {client_id} (sha256 {previous['sha256'][:12]}...); one update per round")
            if self.config.stage(round_number) == "head-statistics":
                row = self._store_statistics(r, client_id, body)
            else:
                row = self._store_update(r, client_id, body)
            reply = self._upload_reply(row, duplicate=False, round_state="open")
            closing = self._close_if_due()
        if closing is not None:
            self._aggregate(closing)
            reply["round_state"] = "aggregated"
        return reply

    def _store_update(self, r: dict, client_id: str, body: bytes) -> dict:
        """Under the lock: check one adapter upload against its plan and store it (blob, then row)."""
        number = r["number"]
        adapter = _decode(body, spec_tensors(self.config.spec))
        digest = update_digest(adapter)
        try:
            checked = check_update(adapter, r["plans"][client_id], self.config.spec, round_number=number,
                                   client_id=client_id, aggregator=self.config.aggregator)
        except WireFormatError as exc:
            raise Invalid(exc.code, str(exc)) from None
        row = {"round": number, "client_id": client_id, "sha256": digest,
               "path": f"uploads/r{number:04d}/{client_id}-{digest[:16]}.safetensors", "rank": checked.rank,
               "effective_rank": checked.effective_rank, "n_samples": checked.n_samples, "bytes": len(body),
               "received_at": self.clock(), "energy": checked.energy}
        pruned = checked.effective_rank < checked.rank
        self._store_upload(row, body, pruned_to=checked.effective_rank if pruned else None)
        log.info("round %d: upload from %s accepted (rank %d, effective rank %d, %d samples); %d of %d in",
                 number, client_id, checked.rank, checked.effective_rank, checked.n_samples,
                 len(queries.uploads(self.store, number)), len(r["selected"]))
        return row

    def _store_statistics(self, r: dict, client_id: str, body: bytes) -> dict:
        """Under the lock: check one round-0 statistics upload and store it (blob, then row)."""
        stats = check_statistics(self.config, client_id, body, queries.client(self.store, client_id)["n_samples"])
        digest = hashlib.sha256(body).hexdigest()
        row = {"round": HEAD_ROUND, "client_id": client_id, "sha256": digest,
               "path": f"uploads/r0000/{client_id}-{digest[:16]}.safetensors", "rank": 0, "effective_rank": 0,
               "n_samples": stats.n_samples, "bytes": len(body), "received_at": self.clock(),
               "energy": energy_of(stats.meta)}
        self._store_upload(row, body, pruned_to=None)
        log.info("round 0: head statistics from %s accepted (%d samples); %d of %d in", client_id, stats.n_samples,
                 len(queries.uploads(self.store, HEAD_ROUND)), len(r["selected"]))
        return row

    def _store_upload(self, row: dict, body: bytes, pruned_to: int | None) -> None:
        """The blob, then its row (and the client's lower rank after self-pruning); no blob without a row."""
        self.store.write_blob(row["path"], body)
        try:
            with self.store.transaction():
                self.store.insert("uploads", row)
                if pruned_to is not None:
                    client = queries.client(self.store, row["client_id"])
                    self.store.update("clients", {"client_id": row["client_id"]},
                                      {"pruned_rank": pruned_to, "rank": min(client["rank"], pruned_to)})
        except BaseException:
            self.store.delete_blob(row["path"])
            raise

    def _digest(self, round_number: int, body: bytes) -> str:
        """What identifies an upload: the content digest of an adapter, the sha256 of statistics bytes."""
        statistics = self.config.stage(round_number) == "head-statistics"
        if statistics:
            return hashlib.sha256(body).hexdigest()
        return update_digest(_decode(body, spec_tensors(self.config.spec)))

    def _check_header(self, round_number: int, body: bytes) -> None:
        """The header within the limits of the round's upload kind (Invalid `header_too_large`), before parsing it."""
        statistics = self.config.stage(round_number) == "head-statistics"
        tensors = len(HEAD_TENSORS) if statistics else spec_tensors(self.config.spec)
        try:
            read_header(body, max_tensors=tensors)
        except WireFormatError as exc:
            raise Invalid(exc.code, str(exc)) from None

    def _upload_reply(self, row: dict, *, duplicate: bool, round_state: str) -> dict:
        client = queries.client(self.store, row["client_id"])
        return {"accepted": True, "round": row["round"], "sha256": row["sha256"], "rank": row["rank"],
                "effective_rank": row["effective_rank"], "duplicate": duplicate, "next_rank": client["rank"],
                "round_state": round_state}

    # --- closing and opening rounds -----------------------------------------------------------------
    def tick(self) -> None:
        """At the deadline: aggregate with >= min_clients uploads, else extend the deadline and say why."""
        with self.lock:
            closing = self._close_if_due()
        if closing is not None:
            self._aggregate(closing)

    def _close_if_due(self) -> dict | None:
        """Under the lock: mark the open round closing and return it when it should aggregate now (every
        selected client uploaded or was dropped, or the deadline passed with enough uploads); past the
        deadline with too few, drop the silent clients, select replacements and extend the deadline."""
        r = queries.open_round(self.store)
        if r is None or self._closing is not None:
            return None
        uploaded = {u["client_id"] for u in queries.uploads(self.store, r["number"])}
        dropped = liveness.dropped(self.store, r["number"])
        silent = [c for c in r["selected"] if c not in uploaded and c not in dropped]
        required = min(self.config.min_clients, len(r["selected"]))
        if not silent and (not dropped or len(uploaded) >= required):
            return self._mark_closing(r)
        if self.clock() < r["deadline"]:
            return None
        with self.store.transaction():
            liveness.drop(self.store, r["number"], silent)
        if silent:
            log.warning("round %d: dropped %s (no upload by the deadline)", r["number"], ", ".join(silent))
        if len(uploaded) >= required:
            log.info("round %d: deadline reached with %d of %d uploads; aggregating",
                     r["number"], len(uploaded), len(r["selected"]))
            return self._mark_closing(r)
        self._extend_deadline(r, len(uploaded), required, len(dropped) + len(silent))
        return None

    def _extend_deadline(self, r: dict, uploaded: int, required: int, dropped: int) -> None:
        """Select replacements for the missing uploads (with their plans) and move the deadline on."""
        extra = liveness.replacements(self.store, r, required - uploaded)
        reason = (f"only {uploaded} of the {required} required uploads arrived by the deadline"
                  + (f"; dropped {dropped} silent client(s)" if dropped else "")
                  + (f"; selected {len(extra)} replacement(s)" if extra else "")
                  + f"; extended by {self.config.round_deadline:g} s")
        with self.store.transaction():
            self.store.update("rounds", {"number": r["number"]}, {
                "deadline": self.clock() + self.config.round_deadline, "extensions": r["extensions"] + 1,
                "extension_reason": reason, "selected": r["selected"] + extra,
                "plans": r["plans"] | self._plans(extra, r["number"])})
        log.warning("round %d: %s", r["number"], reason)

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
                uploads = {u["client_id"]: u for u in queries.uploads(self.store, number)}
            order = [c for c in r["selected"] if c in uploads]
            new_global, statistics = combine_round(self, number, r, [uploads[c] for c in order])
            global_row = self.globals.write(number, new_global)
            with self.lock:
                with self.store.transaction():
                    self.store.insert("globals", global_row)
                    self.store.update("rounds", {"number": number}, {"state": "aggregated",
                                                                     "aggregated_at": self.clock(),
                                                                     "statistics": statistics})
                    opened = self._open_next_round_if_ready()
                self.globals.remember(number, new_global)
        finally:
            with self.lock:
                self._closing = None
        log.info("round %d aggregated (%s) from %d clients (%s)", number, self.config.aggregator, len(order),
                 rank_counts([uploads[c]["effective_rank"] for c in order]))
        log.debug("round %d aggregated from %s: %s", number,
                  ", ".join(f"{c}@r{uploads[c]['effective_rank']}" for c in order), json.dumps(statistics))
        if number >= self.config.last_round:
            self._finish()
        _log_opened(opened)

    def _finish(self) -> None:
        """Say what ran (the head rounds apart from the LoRA rounds), then hand the last global to on_finished."""
        head = (["round 0 (head statistics)"] if self.config.head_round else []) + (
            [f"{self.config.head_rounds} head rounds"] if self.config.head_rounds else [])
        log.info("all rounds done (%s); run finished", ", ".join(head + [f"{self.config.rounds} LoRA rounds"]))
        if self.on_finished is not None:
            self.on_finished(self.global_bytes(self.config.last_round))

    def _open_next_round_if_ready(self) -> dict | None:
        """Inside a transaction: open the next round when none is open, rounds remain and enough clients
        registered: round 0 (head statistics, every registered client) first when the run has one, then
        round last+1 with `clients_per_round` selected, each with its plan. Returns the new round's row
        (None when none opened)."""
        if queries.open_round(self.store) is not None:
            return None
        gone = liveness.absent(self.store)
        clients = sorted((c for c in self.store.select("SELECT client_id, name FROM clients") if c["client_id"] not in gone),
                         key=client_order)
        head_first = self.config.head_round and self.globals.row(0) is None
        number = HEAD_ROUND if head_first else queries.last_round_number(self.store) + 1
        needed = max(self.config.head_clients, self.config.min_clients) if head_first else self.config.min_clients
        if number > self.config.last_round or len(clients) < needed:
            return None
        selected = select_clients([c["client_id"] for c in clients], self.config.round_size(number), self.config.seed,
                                  number)
        now = self.clock()
        row = {"number": number, "state": "open", "selected": selected, "plans": self._plans(selected, number),
               "opened_at": now, "deadline": now + self.config.round_deadline}
        self.store.insert("rounds", row)
        return row

    def _plans(self, client_ids: list[str], number: int) -> dict[str, dict]:
        """The configure step: each client's plan for round `number` (JSON), from the rule, its tier and the run."""
        rows = {c["client_id"]: c for c in self.store.select("SELECT client_id, name, rank, caps FROM clients")}
        stage = self.config.stage(number)
        counts = queries.round_statistics(self.store, HEAD_ROUND)["class_counts"] if stage == "head-fit" else None
        return {c: self.rule.configure(round_number=number, client_key=client_key(rows[c]),
                                       tier=Tier(rows[c]["rank"], **rows[c]["caps"]),
                                       global_rank=self.config.global_rank, seed=self.config.seed, stage=stage,
                                       training=self.config.training_for(number), class_counts=counts).to_json()
                for c in client_ids}

    def _require_open(self, round_number: int) -> dict:
        r = queries.open_round(self.store)
        if r is not None and r["number"] == round_number:
            if self._closing == round_number:
                raise Conflict("round_closed", f"round {round_number} is closed: it is being aggregated now",
                               current_round=round_number)
            return r
        last = queries.last_round_number(self.store)
        if r is not None:
            current, state = r["number"], "open"
        elif last >= self.config.last_round:
            current, state = last, "finished"
        else:
            current, state = last + 1, "waiting for clients"
        if 1 <= round_number <= (current - 1 if r is not None else last):
            raise Conflict("round_closed", f"round {round_number} is closed (already aggregated); the current "
                           f"round is {current} ({state})", current_round=current)
        raise Conflict("round_not_open", f"round {round_number} is not open; the current round is {current} "
                       f"({state})", current_round=current)

    @staticmethod
    def _require_selected(r: dict, client_id: str) -> None:
        if client_id not in r["selected"]:
            raise NotSelected("not_selected", f"{client_id} is not selected for round {r['number']}; "
                           "poll GET /v1/round and wait for a later round")
