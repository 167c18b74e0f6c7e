"""One device round, the same for `hetlora client` (HTTP) and the Flower ClientApp.

`LocalModel` is what a device loads once per run: its examples, its base model checked against the run's
adapter spec, the training backend, and the frozen features that round 0 and the head rounds read
(computed at most once per sequence length). `LocalRound(local, plan, settings, client_id, power).run(start)`
does the round the server planned:

  head-statistics  per-class feature statistics of the local data (round 0; no download)
  head-fit         the downloaded head fitted on the frozen features
  otherwise        a LoRA round (plain, hetlora with self-pruning, plora's Select-N-Fold) from the download

and returns a `RoundOutput`: the wire bytes to send (with their metadata: round, client, ranks, losses,
training seconds and energy estimate), a one-line summary for the log and a report for the server.
Transports move the bytes, store them and map `PlanMismatch` (the server's adapter or plan does not fit
this run) to their own errors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from edge_client.train_config import RoundResult
from hetlora.errors import UserError
from hetlora.protocol.energy import Power
from hetlora.protocol.plan import ClientPlan
from hetlora.protocol.settings import TrainingSettings
from hetlora.protocol.wire import Adapter, WireFormatError, check_values, decode, encode, spec_tensors, validate
from edge_client.model_check import check_head
from hetlora.models.adapter_spec import derive_spec
from hetlora.models.bundled import default_model_dir
from edge_client.backends import make_trainer
from edge_client.head_fit import fit_plan_head, round_statistics
from edge_client.device.profile import with_training_backend
from hetlora.protocol.head_stats import encode_statistics


class PlanMismatch(ValueError):
    """The server's download or plan does not fit this run (the HTTP client: exit 3; Flower: an error reply)."""


def read_plan(doc) -> ClientPlan:
    """The server's plan for a round as both devices take it (PlanMismatch when it is malformed or its training
    settings are outside sane bounds: TrainingSettings.problem)."""
    try:
        plan = ClientPlan.from_json(doc)
    except (ValueError, TypeError, KeyError) as exc:
        raise PlanMismatch(f"the server's plan is not valid: {exc}") from None
    problem = plan.training.problem()
    if problem:
        raise PlanMismatch(f"the server's plan is outside sane bounds: {problem}")
    return plan


def upload_meta(plan: ClientPlan, client_id: str, result: RoundResult, power: Power) -> dict:
    """A LoRA update's wire metadata (docs/PROTOCOL.md section 1), built here and nowhere else: the plan's round,
    rank and indices, the client, what the round produced (effective rank after pruning, samples, losses) and
    its training seconds with the energy estimate at `power` (hetlora.protocol.energy)."""
    meta = {"round": plan.round, "client_id": client_id, "rank": plan.rank, "effective_rank": result.rank_after,
            "n_samples": result.n_samples, "mode": plan.mode, "loss_before": result.loss_before,
            "loss_after": result.loss_after, "energy": power.report(result.seconds)}
    return meta | ({"indices": list(plan.indices)} if plan.indices is not None else {})


def decode_download(raw: bytes, spec, max_rank: int, head_only: bool = False) -> Adapter:
    """A round's download decoded and checked against the local spec, at most `max_rank`, its values within the
    upload bound (WireFormatError); `head_only`: a head round's, the dense head without LoRA factors."""
    start = decode(raw, max_tensors=spec_tensors(spec))
    if head_only and start.lora:
        raise WireFormatError("unexpected_lora", "a head round's download must carry the head only")
    validate(start, spec, max_rank=max_rank, require_all_modules=not head_only)
    check_values(start)  # an update trained from larger values could never be uploaded
    return start


class LocalModel:
    """A device's examples, checked base model and trainer for one run (`run`: the server's run description).
    UserError when the local model does not match the run's spec, or an artifact backend's export does not serve
    the run (its settings with the device's `overrides`); `trainer` lets devices that share a process share one
    (train_round loads everything it trains from the round's adapter)."""

    def __init__(self, run: dict, examples, model_dir=None, *, backend: str = "torch", artifacts_dir=None,
                 trainer=None, overrides: dict | None = None):
        self.run, self.examples = run, examples
        self.model_dir = model_dir or default_model_dir(run["task"])
        labels = run.get("labels")
        check_head(self.model_dir, run["task"], len(labels) if labels else None)
        self.spec = derive_spec(self.model_dir, run["task"], run["targets"], len(labels) if labels else None,
                                pooling=run.get("pooling"))
        if self.spec.fingerprint != run["spec_fingerprint"]:
            raise UserError(f"the local model {self.model_dir} does not match the server's (spec "
                            f"{self.spec.fingerprint} != {run['spec_fingerprint']}); use the same base model folder "
                            f"and LoRA targets")
        self.trainer = trainer or self.make_trainer(run, self.model_dir, backend, artifacts_dir)
        self.manifest = getattr(self.trainer, "manifest", None)  # artifact backends: the run must fit the export
        if self.manifest is not None:
            self.manifest.check_run(run, overrides)
        self._features: dict[int, tuple] = {}

    def profile_for_server(self, profile: dict) -> dict:
        """`profile` with the backend this device trains on (compute.training_backend): the server's tier policy
        predicts that backend's memory."""
        return with_training_backend(profile, self.trainer.backend)

    def request_rank(self, asked: int | None) -> int:
        """The rank to ask the server for: an artifact backend's exported rank (`asked` when it was exported), else
        `asked` or the run's largest."""
        if self.manifest is not None:
            return self.manifest.request_rank(self.trainer.backend, self.run["ranks"], asked)
        return asked or max(self.run["ranks"])

    @staticmethod
    def make_trainer(run: dict, model_dir, backend: str, artifacts_dir):
        """The training backend for `run` (edge_client.backends.make_trainer)."""
        return make_trainer(backend, model_dir=model_dir, task=run["task"], labels=run.get("labels"),
                            targets=run["targets"], lora_alpha=float(run["lora_alpha"]),
                            artifacts_dir=artifacts_dir, pooling=run.get("pooling"))

    @property
    def max_rank(self) -> int:
        """The largest rank a download of this run may carry."""
        return int(self.run.get("global_rank") or max(self.run["ranks"]))

    def start(self, raw: bytes, plan: ClientPlan) -> Adapter:
        """The round's downloaded global, checked against this run (PlanMismatch when it does not fit)."""
        try:
            return decode_download(raw, self.spec, self.max_rank, head_only=plan.mode == "head-fit")
        except WireFormatError as exc:
            raise PlanMismatch(f"round {plan.round}: the server's adapter does not fit this run: {exc}") from None

    def frozen_features(self, seq_len: int) -> tuple:
        """(features, labels) of the examples under the frozen base model, computed once per sequence length."""
        if seq_len not in self._features:
            self._features[seq_len] = self.trainer.frozen_features(self.examples, seq_len)
        return self._features[seq_len]

    @property
    def features_bytes(self) -> int:
        return sum(f.nbytes + y.nbytes for f, y in self._features.values())


@dataclass
class RoundOutput:
    """A finished local round: the wire bytes to send, a log line and the report a transport may pass on."""

    body: bytes
    summary: str
    report: dict = field(default_factory=dict)


@dataclass
class LocalRound:
    """One planned round on `local` (see the module docstring). `settings`: the plan's training settings, with
    any local overrides already applied. `tamper` (a TEST TOOL: an attacker) maps (update, start) to the
    update that is sent."""

    local: LocalModel
    plan: ClientPlan
    settings: TrainingSettings
    client_id: str
    power: Power
    tamper: Callable[[Adapter, Adapter], Adapter] | None = None

    def run(self, start: Adapter | None = None, on_step=None) -> RoundOutput:
        if self.plan.mode == "head-statistics":
            return self._head_statistics()
        if start is None:
            raise ValueError(f"a {self.plan.mode} round starts from the downloaded global")
        if self.plan.mode == "head-fit":
            return self._head_fit(start)
        return self._lora(start, on_step)

    def _head_statistics(self) -> RoundOutput:
        stats = round_statistics(self.local.spec, lambda: self.local.frozen_features(self.settings.seq_len),
                                 self.plan.round, self.client_id, self.power)
        classes = int((stats.class_counts > 0).sum())
        return RoundOutput(encode_statistics(stats), f"head statistics ({stats.n_samples} samples, {classes} "
                           f"classes)", {"n_samples": stats.n_samples})

    def _head_fit(self, start: Adapter) -> RoundOutput:
        features, labels = self.local.frozen_features(self.settings.seq_len)
        try:
            update, fit = fit_plan_head(self.local.spec, start, features, labels, self.plan, self.settings,
                                        self.client_id, self.power)
        except ValueError as exc:
            raise PlanMismatch(f"round {self.plan.round}: the server's head-fit plan does not fit this run: "
                               f"{exc}") from None
        summary = (f"head fitted on {len(labels)} frozen features ({self.settings.head_epochs} epochs), loss "
                   f"{fit.loss_before:.4f} -> {fit.loss_after:.4f}")
        return RoundOutput(encode(self._sent(update, start)), summary,
                           {"loss_before": fit.loss_before, "loss_after": fit.loss_after, "n_samples": len(labels)})

    def _lora(self, start: Adapter, on_step) -> RoundOutput:
        plan = self.plan
        result = self.local.trainer.train_round(start, self.local.examples, self.settings, rank=plan.rank,
                                                indices=list(plan.indices) if plan.indices is not None else None,
                                                mode=plan.mode, on_step=on_step)
        result.adapter.meta = upload_meta(plan, self.client_id, result, self.power)
        pruned = f" -> {result.rank_after} (pruned)" if result.rank_after != result.rank_before else ""
        summary = (f"rank {result.rank_before}{pruned}, loss {result.loss_before:.4f} -> {result.loss_after:.4f}, "
                   f"{result.n_samples} samples, {result.steps} steps")
        report = {"rank_before": result.rank_before, "rank_after": result.rank_after,
                  "loss_before": result.loss_before, "loss_after": result.loss_after, "steps": result.steps,
                  "n_samples": result.n_samples}
        return RoundOutput(encode(self._sent(result.adapter, start)), summary, report)

    def _sent(self, update: Adapter, start: Adapter) -> Adapter:
        return update if self.tamper is None else self.tamper(update, start)
