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
from edge_client.train_config import RoundResult
from hetlora.protocol.energy import Power
from hetlora.protocol.plan import ClientPlan
from hetlora.protocol.settings import TrainingSettings
from hetlora.protocol.wire import (Adapter, WireFormatError, check_values, decode, encode, max_wire_bytes,
                                  spec_tensors, validate)
from hetlora.errors import UserError

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
    training settings are outside sane bounds: TrainingSettings.problem)."""
    try:
        plan = ClientPlan.from_json(current.get("plan"))
    except (ValueError, TypeError, KeyError) as exc:
        raise BadServerAnswer(f"round {current.get('round')}: the server's plan is not valid: {exc}") from None
    problem = plan.training.problem()
    if problem:
        raise BadServerAnswer(f"round {plan.round}: the server's plan is outside sane bounds: {problem}")
    return plan


def upload_meta(plan: ClientPlan, client_id: str, result: RoundResult, power: Power) -> dict:
    """A LoRA update's wire metadata (docs/PROTOCOL.md section 1), built here and nowhere else: the plan's round,
    rank and indices, the client, what the round produced (effective rank after pruning, samples, losses) and
    its training seconds with the energy estimate at `power` (hetlora.protocol.energy)."""
    meta = {"round": plan.round, "client_id": client_id, "rank": plan.rank, "effective_rank": result.rank_after,
            "n_samples": result.n_samples, "mode": plan.mode, "loss_before": result.loss_before,
            "loss_after": result.loss_after, "energy": power.report(result.seconds)}
    return meta | ({"indices": list(plan.indices)} if plan.indices is not None else {})


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


def decode_download(raw: bytes, spec, max_rank: int, head_only: bool = False) -> Adapter:
    """A round's download decoded and checked against the local spec, at most `max_rank`, its values within the
    upload bound (WireFormatError); `head_only`: a head round's, the dense head without LoRA factors."""
    start = decode(raw, max_tensors=spec_tensors(spec))
    if head_only and start.lora:
        raise WireFormatError("unexpected_lora", "a head round's download must carry the head only")
    validate(start, spec, max_rank=max_rank, require_all_modules=not head_only)
    check_values(start)  # an update trained from larger values could never be uploaded
    return start


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
        self.trainer = None
        self.examples = None
        self.spec = None
        self.overrides = dict(options.train_overrides or {})  # TrainingSettings fields over the plan
        self._features = None  # the frozen features (round 0 and the head rounds), computed once
        self._refused_round = None  # the round whose update the server refused, if any
        self._power: Power | None = None  # the energy estimates' power figure, found once

    def power(self) -> Power:
        """The power figure of the energy estimates (`--watts`, else the profile's catalog device), found once and
        logged; unknown figures are said so."""
        if self._power is None:
            from edge_client.device.profile import training_power

            self._power = training_power(self.options.watts, self.profile_source())
            if self._power.watts is None:
                log.info("training energy unknown: no --watts and the device matches no catalog entry")
            else:
                log.info("training energy estimated at %g W (%s) x the training seconds", self._power.watts,
                         self._power.source)
        return self._power

    def run(self) -> int:
        """Rounds until the server says training is finished (or max_rounds local rounds). Returns 0."""
        from edge_client.data import load_examples

        run = self.state.run if self.state.registered else self.api.run()
        self.examples = load_examples(self.options.data, run["task"], run.get("labels"),
                                      text_column=self.options.text_column, label_column=self.options.label_column)
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
            if self._round(current, run):
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
        n_samples = len(self.examples)
        reply = self.api.register(self.profile_source(), requested, n_samples, self.options.name,
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
        """Load the trainer after checking the local model (and artifacts) agree with the server's run; the rank to ask
        for."""
        from edge_client.backends import make_trainer
        from edge_client.model_check import check_head
        from edge_client.models import default_model_dir, derive_spec

        model_dir = self.options.model_dir or default_model_dir(run["task"])
        labels = run.get("labels")
        check_head(model_dir, run["task"], len(labels) if labels else None)
        spec = derive_spec(model_dir, run["task"], run["targets"], len(labels) if labels else None,
                           pooling=run.get("pooling"))
        if spec.fingerprint != run["spec_fingerprint"]:
            raise UserError(f"the local model {model_dir} does not match the server's (spec {spec.fingerprint} != "
                            f"{run['spec_fingerprint']}); use the same base model folder and LoRA targets")
        self.spec = spec
        self.trainer = make_trainer(self.options.backend, model_dir=model_dir, task=run["task"], labels=labels,
                                    targets=run["targets"], lora_alpha=float(run["lora_alpha"]),
                                    artifacts_dir=self.options.artifacts_dir, pooling=run.get("pooling"))
        manifest = getattr(self.trainer, "manifest", None)  # artifact backends: the run must fit the export
        if manifest is not None:
            manifest.check_run(run, self.overrides)
        self.requested_rank = manifest.request_rank(self.trainer.backend, run["ranks"], self.options.requested_rank) \
            if manifest is not None else self.options.requested_rank or max(run["ranks"])

    def _refresh_rank(self) -> None:
        """Re-profile (quick) before training and tell the server; the reply is the rank for the next round."""
        try:
            reply = self.api.report_profile(self.profile_source())
        except ServerError as exc:
            log.warning("profile report rejected: %s", exc)
            return
        if reply.get("rank") != self.state.rank:
            log.info("server moved this device from rank %s to %s for later rounds", self.state.rank, reply.get("rank"))
            self.state.rank = reply.get("rank")
            self.state_dir.save(self.state)

    def _round(self, current: dict, run: dict) -> bool:
        """One round, as the server's plan for it says: returns True when an update was accepted."""
        number = current["round"]
        plan = plan_of(current)
        cfg = plan.training.updated(self.overrides)
        if cfg.problem():
            raise UserError(f"the local training overrides are outside sane bounds: {cfg.problem()}")
        pending = self.state_dir.pending(number)
        if pending is None and plan.mode == "head-statistics":
            pending, summary, elapsed = self._head_statistics(number, cfg)
        elif pending is None and plan.mode == "head-fit":
            t0, raw = time.perf_counter(), self._download(number)
            if raw is None:
                return False
            start = self._checked_download(raw, number, run, head_only=True)
            pending, summary = self._head_fit(number, plan, cfg, start)
            summary, elapsed = f"{summary}, {len(raw)} B down", time.perf_counter() - t0
        elif pending is None:
            self._refresh_rank()
            t0, raw = time.perf_counter(), self._download(number)
            if raw is None:
                return False
            start = self._checked_download(raw, number, run)
            log.info("round %d: training %s at rank %d (%d steps, batch %d, seq %d, %s lr %g)", number, plan.mode,
                     plan.rank, cfg.steps or 0, cfg.batch_size, cfg.seq_len, cfg.optimizer, cfg.lr)
            result = self.trainer.train_round(start, self.examples, cfg, rank=plan.rank,
                                              indices=list(plan.indices) if plan.indices is not None else None,
                                              mode=plan.mode, on_step=self._progress(number, cfg))
            result.adapter.meta = upload_meta(plan, self.state.client_id, result, self.power())
            pending = encode(self._attack(result.adapter, start, plan))
            self.state_dir.save_pending(pending)
            summary = (f"rank {result.rank_before}" + (f" -> {result.rank_after} (pruned)" if result.rank_after !=
                       result.rank_before else "") + f", loss {result.loss_before:.4f} -> {result.loss_after:.4f}, "
                       f"{result.n_samples} samples, {result.steps} steps, {len(raw)} B down")
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

    def _head_statistics(self, number: int, cfg: TrainingSettings) -> tuple[bytes, str, float]:
        """Round 0: per-class feature statistics of the local data under the frozen base model, saved as pending."""
        from edge_client.head_fit import round_statistics
        from hetlora.protocol.head_stats import encode_statistics

        t0 = time.perf_counter()
        stats = round_statistics(self.spec, lambda: self._frozen_features(cfg), number, self.state.client_id,
                                 self.power())
        pending = encode_statistics(stats)
        self.state_dir.save_pending(pending)
        classes = int((stats.class_counts > 0).sum())
        log.info("round %d: head statistics of %d samples over %d classes", number, stats.n_samples, classes)
        return pending, f"head statistics ({stats.n_samples} samples, {classes} classes)", time.perf_counter() - t0

    def _download(self, number: int) -> bytes | None:
        """The round's download, at most the largest valid adapter of the run (checked while it streams); None when
        the round is no longer this client's (closed, not selected)."""
        limit = max_wire_bytes(self.spec, int(self.state.run.get("global_rank") or max(self.state.run["ranks"])))
        try:
            return self.api.download_adapter(number, max_bytes=limit)
        except ServerError as exc:
            if exc.code in ("round_closed", "not_selected", "no_such_round", "round_not_open"):
                log.info("round %d: %s; waiting for the next round", number, exc)
                return None
            raise

    def _head_fit(self, number: int, plan: ClientPlan, cfg: TrainingSettings, start: Adapter) -> tuple[bytes, str]:
        """A head round: fit the downloaded head on the frozen features (edge_client.head_fit), saved as pending."""
        from edge_client.head_fit import fit_plan_head

        features, labels = self._frozen_features(cfg)
        try:
            update, fit = fit_plan_head(self.spec, start, features, labels, plan, cfg, self.state.client_id,
                                        self.power())
        except ValueError as exc:
            raise BadServerAnswer(f"round {number}: the server's head-fit plan does not fit this run: {exc}") from None
        pending = encode(self._attack(update, start, plan))
        self.state_dir.save_pending(pending)
        return pending, (f"head fitted on {len(labels)} frozen features ({cfg.head_epochs} epochs), loss "
                         f"{fit.loss_before:.4f} -> {fit.loss_after:.4f}")

    def _attack(self, update: Adapter, start: Adapter, plan: ClientPlan) -> Adapter:
        """The update as sent: itself, or (TEST TOOL, --testing-scale-update) scaled as an attacker's."""
        if self.options.testing_scale_update is None:
            return update
        log.warning("TEST TOOL: uploading the update scaled %g x from its start (--testing-scale-update)",
                    self.options.testing_scale_update)
        return scaled_update(update, start, plan, self.options.testing_scale_update)

    def _frozen_features(self, cfg: TrainingSettings):
        """(features, labels) of the local data under the frozen base model, computed once per process."""
        if self._features is None:
            self._features = self.trainer.frozen_features(self.examples, cfg.seq_len)
        return self._features

    def _checked_download(self, raw: bytes, number: int, run: dict, head_only: bool = False):
        """The downloaded adapter, checked against the local spec (BadServerAnswer when it does not fit);
        `head_only`: a head round's download, the dense head without LoRA factors."""
        try:
            return decode_download(raw, self.spec, int(run.get("global_rank") or max(run["ranks"])), head_only)
        except WireFormatError as exc:
            raise BadServerAnswer(f"round {number}: the server's adapter does not fit this run: {exc}") from None

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
