"""The edge client's federated loop: register, then per round download, train, prune, upload.

Durability: identity and progress live in the state directory (`client_state`). A trained
update is saved there before it is uploaded, so a client killed mid-round uploads the same
bytes after a restart instead of training again, and a round the server already has is
never uploaded twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from edge_client.answers import BadServerAnswer
from edge_client.client_state import StateDir, run_change
from edge_client.server_api import ServerAPI, ServerError
from edge_client.local_round import LocalModel, LocalRound, PlanMismatch, RoundOutput, read_plan
from hetlora.protocol.energy import Power
from hetlora.protocol.plan import ClientPlan
from hetlora.protocol.settings import TrainingSettings
from hetlora.protocol.wire import Adapter, max_wire_bytes
from hetlora.errors import UserError
from edge_client.device.profile import training_power
from edge_client.data import load_examples

log = logging.getLogger("hetlora.client")

@dataclass
class ClientOptions:
    server: str
    data: str
    state_dir: str
    model_dir: str | None = None
    backend: str = "torch"
    artifacts_dir: str | None = None
    requested_rank: int | None = None  # None: the largest rank the server offers (the policy may lower it)
    name: str | None = None
    text_column: str = "text"
    label_column: str | None = None
    max_rounds: int | None = None  # stop after this many local rounds (the next run resumes)
    poll_seconds: float | None = None  # None: the server's hint
    progress: bool = True
    train_overrides: dict | None = None  # TrainingSettings fields that override the plan's settings
    give_up_after: float | None = None  # seconds of failed retries before giving up (None: never)
    enroll_secret: str | None = None  # the server's enrollment secret, when it requires one
    ca_file: str | None = None  # CA certificate(s) to verify an https:// server (None: the requests CA bundle)
    testing_scale_update: float | None = None  # TEST TOOL ONLY: upload start + s (update - start), an attacker
    watts: float | None = None  # --watts: the training power of the energy estimates (None: the catalog's)


def plan_of(current: dict) -> ClientPlan:
    """The plan in a `GET /v1/round` answer for a selected client (BadServerAnswer when it is not one, or when its
    training settings are outside sane bounds: local_round.read_plan)."""
    try:
        return read_plan(current.get("plan"))
    except PlanMismatch as exc:
        raise BadServerAnswer(f"round {current.get('round')}: {exc}") from None


def scaled_update(update: Adapter, start: Adapter, plan: ClientPlan, factor: float) -> Adapter:
    """TEST TOOL (the hidden `hetlora client --testing-scale-update`, for robustness measurements only): the update
    a model-replacement attacker sends, start + factor (update - start) for every factor and dense tensor, with
    the start's components in the order of the upload (plora: the plan's indices; else the first r)."""
    lora = {}
    for name, (a, b) in update.lora.items():
        a0, b0 = start.lora[name]
        idx = list(plan.indices) if plan.indices is not None else list(range(a.shape[0]))
        lora[name] = ((a0[idx] + factor * (a - a0[idx])).astype(np.float32),
                      (b0[:, idx] + factor * (b - b0[:, idx])).astype(np.float32))
    dense = {name: (start.dense[name] + factor * (t - start.dense[name])).astype(np.float32)
             for name, t in update.dense.items()}
    return Adapter(lora=lora, dense=dense, meta=update.meta)


class EdgeClient:
    def __init__(self, options: ClientOptions, profile_source: Callable[[], dict]):
        self.options = options
        self.profile_source = profile_source
        self.state_dir = StateDir(options.state_dir)
        self.state = self.state_dir.load(options.server)
        self.api = ServerAPI(options.server, self.state.token, give_up_after=options.give_up_after,
                             ca_file=options.ca_file)
        host = urlsplit(options.server).hostname
        if urlsplit(options.server).scheme == "http" and host not in ("localhost", None) \
                and not host.startswith(("127.", "::1")):
            log.warning("plain HTTP to %s: the token and updates cross the network in clear text; ask for an "
                        "https:// server (docs/DEVICES.md, TLS)", options.server)
        self.local: LocalModel | None = None  # the data, checked model and backend (_prepare)
        self.overrides = dict(options.train_overrides or {})  # TrainingSettings fields over the plan
        self._refused_round = None  # the round whose update the server refused, if any
        self._power: Power | None = None  # the energy estimates' power figure, found once

    def power(self) -> Power:
        """The power figure of the energy estimates (`--watts`, else the profile's catalog device), found once and
        logged; unknown figures are said so."""
        if self._power is None:
            self._power = training_power(self.options.watts, self.profile_source())
            if self._power.watts is None:
                log.info("training energy unknown: no --watts and the device matches no catalog entry")
            else:
                log.info("training energy estimated at %g W (%s) x the training seconds", self._power.watts,
                         self._power.source)
        return self._power

    def run(self) -> int:
        """Rounds until the server says training is finished (or max_rounds local rounds). Returns 0."""
        run = self.state.run if self.state.registered else self.api.run()
        self._prepare(run)  # model, data and backend load first: a client that cannot train never registers
        self._register(run)
        registered_again = False  # once per process: a token refused again right after is the server's error
        while True:
            try:
                return self._rounds()
            except ServerError as exc:
                if exc.code != "bad_token" or registered_again:
                    raise
                self._register_again()
                registered_again = True

    def _rounds(self) -> int:
        """Follow the server's rounds until it says training is finished (or max_rounds local rounds)."""
        run = self.state.run
        poll = self.options.poll_seconds or float(run.get("poll_seconds", 1.0))
        done = 0
        waiting_logged = None
        while self.options.max_rounds is None or done < self.options.max_rounds:
            current = self.api.current_round()
            number = current["round"]
            if current["state"] == "finished":
                log.info("training finished (the last round was %d); client %s stops", number, self.state.client_id)
                return 0
            if current["state"] != "open" or not current["selected"] or current["uploaded"] \
                    or number <= self.state.last_uploaded_round:
                if waiting_logged != (number, current["state"]):
                    log.info("round %s %s: %s", number, current["state"], self._why_waiting(current))
                    waiting_logged = (number, current["state"])
                time.sleep(poll)
                continue
            if self._round(current):
                done += 1
        log.info("stopping after %d local rounds (--max-rounds); restart to continue", done)
        return 0

    def _why_waiting(self, current: dict) -> str:
        if current["state"] == "waiting":
            return "waiting for enough clients to register"
        if not current["selected"]:
            return "not selected this round; waiting for the next"
        if current["round"] == self._refused_round:
            return "the server refused this round's update; waiting for the next round"
        return "update uploaded; waiting for the other clients"

    def _register(self, run: dict) -> None:
        """Register once (identity saved in the state dir); a restarted client resumes instead."""
        if self.state.registered:
            log.info("resuming as client %s (rank %s) from %s", self.state.client_id, self.state.rank,
                     self.state_dir.path)
            return
        requested = self.requested_rank
        n_samples = len(self.local.examples)
        reply = self.api.register(self._profile(), requested, n_samples, self.options.name,
                                  self.options.enroll_secret)
        self.state.client_id, self.state.token, self.state.rank = reply["client_id"], reply["token"], reply["rank"]
        self.state.run = reply["run"]
        self.state_dir.save(self.state)
        self.api.token = self.state.token
        log.info("registered as %s: rank %d (asked for %d), %d samples, aggregator %s",
                 self.state.client_id, self.state.rank, requested, n_samples, self.state.run["aggregator"])

    def _register_again(self) -> None:
        """The server no longer knows this client's token (its state was reset): register anew when its run is one
        this client's model and data serve, else a UserError (exit 2) that says to start afresh."""
        run = self.api.run()
        changed = run_change(self.state.run, run)
        if changed:
            raise UserError(f"the server no longer knows this client and runs another run ({changed} changed): delete "
                            f"--state-dir {self.state_dir.path} and start the client again")
        log.warning("the server no longer knows client %s (a new run of the same model and task); registering again",
                    self.state.client_id)
        self.state_dir.forget(self.state)
        self.api.token = None
        self._register(run)

    def _prepare(self, run: dict) -> None:
        """Load the data, and the model checked against the server's spec, and the training backend; an artifact
        backend's export checked against the run too, before registering; the rank to ask for."""
        examples = load_examples(self.options.data, run["task"], run.get("labels"),
                                 text_column=self.options.text_column, label_column=self.options.label_column)
        self.local = LocalModel(run, examples, self.options.model_dir, backend=self.options.backend,
                                artifacts_dir=self.options.artifacts_dir, overrides=self.overrides)
        self.requested_rank = self.local.request_rank(self.options.requested_rank)

    def _profile(self) -> dict:
        """The device profile the server's tier policy reads, with the backend this client trains on."""
        return self.local.profile_for_server(self.profile_source())

    def _refresh_rank(self) -> None:
        """Re-profile (quick) before training and tell the server; the reply is the rank for the next round."""
        try:
            reply = self.api.report_profile(self._profile())
        except ServerError as exc:
            log.warning("profile report rejected: %s", exc)
            return
        if reply.get("rank") != self.state.rank:
            log.info("server moved this device from rank %s to %s for later rounds", self.state.rank, reply.get("rank"))
            self.state.rank = reply.get("rank")
            self.state_dir.save(self.state)

    def _round(self, current: dict) -> bool:
        """One round, as the server's plan for it says: returns True when an update was accepted."""
        number = current["round"]
        plan = plan_of(current)
        cfg = plan.training.updated(self.overrides)
        if cfg.problem():
            raise UserError(f"the local training overrides are outside sane bounds: {cfg.problem()}")
        pending = self.state_dir.pending(number)
        if pending is None:
            t0, raw = time.perf_counter(), None
            if plan.mode != "head-statistics":
                if plan.mode != "head-fit":
                    self._refresh_rank()
                raw = self._download(number)
                if raw is None:
                    return False
            output = self._local_round(plan, cfg, raw)
            pending = output.body
            self.state_dir.save_pending(pending)
            summary = output.summary + (f", {len(raw)} B down" if raw is not None else "")
            elapsed = time.perf_counter() - t0
        else:
            log.info("round %d: uploading the update saved before a restart", number)
            summary, elapsed = "resumed", 0.0
        try:
            reply = self.api.upload_update(number, pending)
        except ServerError as exc:
            if exc.code in ("round_closed", "duplicate_upload"):
                log.warning("round %d: upload not taken (%s)", number, exc)
                self._finish_round(number)
                return False
            if exc.status in (400, 413):  # the update itself is refused: keep it for inspection, never re-send it
                kept = self.state_dir.reject_pending(number, exc.code)
                log.error("round %d: the server refused the update (%s); moved it to %s", number, exc, kept)
                self._finish_round(number)
                self._refused_round = number
                return False
            raise
        self._finish_round(number)
        if reply.get("next_rank") is not None and reply["next_rank"] != self.state.rank:
            self.state.rank = reply["next_rank"]
            self.state_dir.save(self.state)
        log.info("round %d: %s, %d B up, %.1f s", number, summary, len(pending), elapsed)
        return True

    def _local_round(self, plan: ClientPlan, cfg: TrainingSettings, raw: bytes | None) -> RoundOutput:
        """The planned round on this device (edge_client.local_round); a download or plan that does not fit the
        run is the server's fault (BadServerAnswer)."""
        on_step = None
        if plan.mode not in ("head-statistics", "head-fit"):
            log.info("round %d: training %s at rank %d (%d steps, batch %d, seq %d, %s lr %g%s)", plan.round, plan.mode,
                     plan.rank, cfg.steps or 0, cfg.batch_size, cfg.seq_len, cfg.optimizer, cfg.lr,
                     ", activation checkpointing" if cfg.activation_checkpointing else "")
            on_step = self._progress(plan.round, cfg)
        try:
            start = None if raw is None else self.local.start(raw, plan)
            return LocalRound(self.local, plan, cfg, self.state.client_id, self.power(),
                              self._attack(plan)).run(start, on_step)
        except PlanMismatch as exc:
            raise BadServerAnswer(str(exc)) from None

    def _download(self, number: int) -> bytes | None:
        """The round's download, at most the largest valid adapter of the run (checked while it streams); None when
        the round is no longer this client's (closed, not selected)."""
        limit = max_wire_bytes(self.local.spec, self.local.max_rank)
        try:
            return self.api.download_adapter(number, max_bytes=limit)
        except ServerError as exc:
            if exc.code in ("round_closed", "not_selected", "no_such_round", "round_not_open"):
                log.info("round %d: %s; waiting for the next round", number, exc)
                return None
            raise

    def _attack(self, plan: ClientPlan):
        """None, or (TEST TOOL, --testing-scale-update) the map from an update to the one an attacker sends."""
        factor = self.options.testing_scale_update
        if factor is None:
            return None
        log.warning("TEST TOOL: uploading the update scaled %g x from its start (--testing-scale-update)", factor)
        return lambda update, start: scaled_update(update, start, plan, factor)

    def _finish_round(self, number: int) -> None:
        self.state.last_uploaded_round = max(self.state.last_uploaded_round, number)
        self.state_dir.save(self.state)
        self.state_dir.clear_pending()

    def _progress(self, number: int, cfg: TrainingSettings):
        if not self.options.progress:
            return None
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, desc=f"round {number}", unit="step", leave=False)

        def on_step(step: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if cfg.steps and step >= cfg.steps:
                bar.close()

        return on_step
