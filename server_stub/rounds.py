"""The round state machine, independent of HTTP: open a round with each selected client's plan, take uploads,
close it at the deadline or when every upload is in, aggregate, open the next.

States (docs/PROTOCOL.md section 4): waiting -> open(n) -> aggregate(n) -> open(n+1) ... finished.
Every public method takes the coordinator's lock, so HTTP worker threads and the deadline ticker see one
consistent state. Every change is committed to the Store before it is reported. The round engine
(hetlora.engine) plans, checks and combines; the typed store (run_store) owns the SQL, blob paths and
optimiser state; the round state (round_state) owns what each stage does with an upload; registration, the
global versions and the status live in their own modules. This one sequences them.
"""

from __future__ import annotations

import json
import logging
import threading
import time

from hetlora.engine.combine import first_global
from hetlora.engine.config import ServerConfig
from hetlora.engine.errors import Conflict, NotSelected
from hetlora.engine.head_round import HEAD_ROUND
from hetlora.engine.planning import download_view, plan_for, select
from hetlora.engine.selection import client_key, client_order
from hetlora.engine.uploads import receive, take
from hetlora.protocol.plan import ClientPlan
from hetlora.protocol.wire import encode
from server_stub import history, liveness
from server_stub.global_versions import GlobalVersions
from server_stub.registration import Registration
from server_stub.round_state import RoundState
from server_stub.run_store import Round, RunStore
from server_stub.store import Store

log = logging.getLogger("hetlora.server")


def rank_counts(ranks: list[int]) -> str:
    """`r4 x3, r8 x1`: how many clients train (or uploaded) at each rank, for a log line of bounded length."""
    return ", ".join(f"r{r} x{ranks.count(r)}" for r in sorted(set(ranks)))


def _log_opened(r: Round | None) -> None:
    if r is not None:
        log.info("round %d open: %d clients selected (%s)", r.number, len(r.selected),
                 rank_counts([r.plans[c].rank for c in r.selected]))
        log.debug("round %d selected %s", r.number, ", ".join(f"{c}@r{r.plans[c].rank}" for c in r.selected))


class Coordinator:
    """Runs the rounds of one federated run over a Store and a pure aggregation rule."""

    def __init__(self, config: ServerConfig, store: Store, rule, clock=time.time, on_finished=None):
        self.config = config
        self.on_finished = on_finished  # called with the last global's wire bytes when the run finishes
        self.store = store
        self.runs = RunStore(store)
        self.rule = rule
        self.clock = clock
        self.lock = threading.RLock()
        self.globals = GlobalVersions(store, clock)
        self.rounds = RoundState(config, self.runs, clock)
        self.registration = Registration(config, self.runs, rule, self.lock, clock, self._open_next_round_if_ready)
        self._closing: int | None = None  # the round being aggregated right now
        self.aggregation_observers: list = []  # each called with a head or LoRA round's combine seconds (metrics)
        with self.lock:
            if self.globals.row(0) is None and not config.head_round:
                self.globals.commit(0, first_global(rule, config))
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
            next_rank = self.rule.planned_rank(self.runs.client(client_id)["rank"], self.config.global_rank)
            r = self.runs.open_round()
            if r is not None:
                plan = r.plans.get(client_id)
                return {
                    "round": r.number, "state": "open", "deadline": r.deadline, "selected": plan is not None,
                    "stage": self.config.stage(r.number), "plan": plan.to_json() if plan else None,
                    "rank": plan.rank if plan else next_rank,
                    "indices": list(plan.indices) if plan and plan.indices is not None else None,
                    "seed": plan.training.seed if plan else None,
                    "uploaded": self.runs.upload(r.number, client_id) is not None,
                    "rounds": self.config.last_round, "global_version": r.number - 1,
                }
            last = self.runs.last_round_number()
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
            self.rounds.require_download(round_number)
            data = encode(download_view(self.rule, self.globals.adapter(round_number - 1), r.plans[client_id],
                                        client_id, self.config))
            self.runs.record_download(round_number, client_id, len(data), self.clock())
            return data

    def global_bytes(self, version: int | None = None) -> bytes:
        """The wire bytes of a global version (the latest when None)."""
        with self.lock:
            return self.globals.wire_bytes(version)

    def status(self) -> dict:
        with self.lock:
            round_info, finished = history.current_round(self.runs, self.config.last_round, self._closing)
            clients = history.clients(self.runs, lambda rank: self.rule.planned_rank(rank, self.config.global_rank))
            return {"round": round_info, "rounds": self.config.last_round, "finished": finished,
                    "aggregator": self.config.aggregator, "global_version": self.globals.latest_version(),
                    "clients": clients, "history": history.history(self.runs, self.config.stage),
                    "run": self.config.run_config()}

    # --- uploads ---------------------------------------------------------------------------------
    def accept_upload(self, client_id: str, round_number: int, body: bytes) -> dict:
        """Check and store one update; aggregate when it completes the round. Nothing is stored on error.

        The identical update again (same digest) is answered 200 even after its round closed, so a client may
        retry an upload whose reply it lost. The header's size is checked and an adapter decoded (once: the
        decoded adapter is what is checked and combined) before the lock is taken, so a header bomb or a large
        upload does not hold other clients. The engine receives and checks it (hetlora.engine.uploads), the round
        state keeps it (server_stub.round_state): the bytes go down the layers once."""
        received = receive(self.config, round_number, body)
        with self.lock:
            liveness.seen(self.store, client_id)
            previous = self.runs.upload(round_number, client_id)
            if previous is not None and previous["sha256"] == received.digest:
                return self._upload_reply(previous, duplicate=True, round_state=self.runs.round(round_number).state)
            r = self._require_open(round_number)
            self._require_selected(r, client_id)
            if previous is not None:
                raise Conflict("duplicate_upload", f"round {round_number} already has a different update from "
                               f"{client_id} (sha256 {previous['sha256'][:12]}...); one update per round")
            update = take(self.config, r.plans[client_id], client_id, received,
                          self.runs.client(client_id)["n_samples"])
            row = self.rounds.keep(r, client_id, body, update)
            reply = self._upload_reply(row, duplicate=False, round_state="open")
            closing = self._close_if_due()
        if closing is not None:
            self._aggregate(closing)
            reply["round_state"] = "aggregated"
        return reply

    def _upload_reply(self, row: dict, *, duplicate: bool, round_state: str) -> dict:
        client = self.runs.client(row["client_id"])
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

    def _close_if_due(self) -> Round | None:
        """Under the lock: mark the open round closing and return it when it should aggregate now (every
        selected client uploaded or was dropped, or the deadline passed with enough uploads); past the
        deadline with too few, drop the silent clients, select replacements and extend the deadline."""
        r = self.runs.open_round()
        if r is None or self._closing is not None:
            return None
        uploaded = {u["client_id"] for u in self.runs.uploads(r.number)}
        dropped = liveness.dropped(self.store, r.number)
        silent = [c for c in r.selected if c not in uploaded and c not in dropped]
        required = self.config.required_uploads(len(r.selected))
        if not silent and (not dropped or len(uploaded) >= required):
            return self._mark_closing(r)
        if self.clock() < r.deadline:
            return None
        with self.store.transaction():
            liveness.drop(self.store, r.number, silent)
        if silent:
            log.warning("round %d: dropped %s (no upload by the deadline)", r.number, ", ".join(silent))
        if len(uploaded) >= required:
            log.info("round %d: deadline reached with %d of %d uploads; aggregating",
                     r.number, len(uploaded), len(r.selected))
            return self._mark_closing(r)
        self._extend_deadline(r, len(uploaded), required, len(dropped) + len(silent))
        return None

    def _extend_deadline(self, r: Round, uploaded: int, required: int, dropped: int) -> None:
        """Select replacements for the missing uploads (with their plans) and move the deadline on."""
        extra = liveness.replacements(self.store, r.selected, required - uploaded)
        reason = (f"only {uploaded} of the {required} required uploads arrived by the deadline"
                  + (f"; dropped {dropped} silent client(s)" if dropped else "")
                  + (f"; selected {len(extra)} replacement(s)" if extra else "")
                  + f"; extended by {self.config.round_deadline:g} s")
        with self.store.transaction():
            self.runs.extend_round(r, self.clock() + self.config.round_deadline, reason, extra,
                                   self._plans(extra, r.number))
        log.warning("round %d: %s", r.number, reason)

    def _mark_closing(self, r: Round) -> Round:
        self._closing = r.number
        return r

    def _aggregate(self, r: Round) -> None:
        """Aggregate a round marked closing. The rule runs outside the lock, so other requests are answered
        meanwhile (uploads for this round are refused); then the new global blob is written and, in one
        transaction, its row, the closed round and the next round are committed."""
        number = r.number
        try:
            with self.lock:
                uploads = {u["client_id"]: u for u in self.runs.uploads(number)}
                previous = self.globals.adapter(number - 1) if number > HEAD_ROUND else None
                anchors = self.runs.last_anchors()
            order = [c for c in r.selected if c in uploads]
            started = time.perf_counter()
            new_global, statistics = self.rounds.combine(self.rule, r, [uploads[c] for c in order], previous,
                                                            anchors)
            if number > HEAD_ROUND:
                for observe in self.aggregation_observers:
                    observe(time.perf_counter() - started)
            global_row = self.globals.write(number, new_global)
            with self.lock:
                with self.store.transaction():
                    self.store.insert("globals", global_row)
                    self.runs.close_round(number, self.clock(), statistics)
                    opened = self._open_next_round_if_ready()
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

    def _open_next_round_if_ready(self) -> Round | None:
        """Inside a transaction: open the next round when none is open, rounds remain and enough clients
        registered: round 0 (head statistics, every registered client) first when the run has one, then
        round last+1 with `clients_per_round` selected, each with its plan. Returns the new round (None when
        none opened)."""
        if self.runs.open_round() is not None:
            return None
        gone = liveness.absent(self.store)
        clients = sorted((c for c in self.runs.clients() if c["client_id"] not in gone), key=client_order)
        head_first = self.config.head_round and self.globals.row(0) is None
        number = HEAD_ROUND if head_first else self.runs.last_round_number() + 1
        first = head_first or (not self.config.head_round and self.runs.last_round_number() == 0)
        needed = self.config.first_round_clients if first else self.config.min_clients
        if number > self.config.last_round or len(clients) < needed:
            return None
        selected = select(self.config, [c["client_id"] for c in clients], number)
        now = self.clock()
        return self.runs.insert_round(number, selected, self._plans(selected, number), now,
                                      now + self.config.round_deadline)

    def _plans(self, client_ids: list[str], number: int) -> dict[str, ClientPlan]:
        """The configure step (hetlora.engine.planning): each client's plan for round `number` from its tier."""
        tiers = self.runs.tiers()
        head_fit = self.config.stage(number) == "head-fit"
        counts = self.runs.round_statistics(HEAD_ROUND)["class_counts"] if head_fit else None
        return {c: plan_for(self.config, self.rule, client_key(tiers[c][0]), tiers[c][1], number, counts)
                for c in client_ids}

    def _require_open(self, round_number: int) -> Round:
        r = self.runs.open_round()
        if r is not None and r.number == round_number:
            if self._closing == round_number:
                raise Conflict("round_closed", f"round {round_number} is closed: it is being aggregated now",
                               current_round=round_number)
            return r
        last = self.runs.last_round_number()
        if r is not None:
            current, state = r.number, "open"
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
    def _require_selected(r: Round, client_id: str) -> None:
        if client_id not in r.selected:
            raise NotSelected("not_selected", f"{client_id} is not selected for round {r.number}; "
                              "poll GET /v1/round and wait for a later round")
