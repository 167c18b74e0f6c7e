"""The device side of a Flower node: its settings, model, data and one planned round.

Node config (`flower-supernode --node-config "..."`), all optional except `data`:
  data           the node's CSV/JSONL training file
  name           the name that orders and seeds the node (default: node-<Flower node id>)
  state-dir      where the node keeps every update it sent (uploads/rNNNN.safetensors)
  model-dir      the base model folder (default: the installed all-MiniLM-L6-v2)
  backend        torch | onnx | executorch | auto (default torch); artifacts-dir for the artifact backends
  device         a catalog id: report that device's profile instead of measuring this machine
  profile-file   report the profile in this JSON file instead
  requested-rank the largest rank this node asks for
  watts          this device's training power for the energy estimates (default: the profile's catalog figure)
Under Flower's simulation runtime a node has only `partition-id` and `num-partitions`; it then trains on
file `partition-id` of the run config's `partition-dir` (written by `hetlora partition`) as device
`partition-id` of `profiles.catalog.simulated_fleet(num-partitions, seed)`.

A round runs the HTTP client's pieces: the plan (hetlora.protocol.plan.ClientPlan: rank, indices, mode,
training settings already within the device's tier), the same trainer (`make_trainer`), self-pruning and
Select-N-Fold inside `train_round`, and the same metadata on the update (with the training seconds and the
energy estimate at `NodeSettings.power`). The node reports a fresh device profile with every LoRA update; the
server re-decides its tier from it for the next round.
Round 0 and the head rounds read the node's frozen features, kept per process (`_features`): a simulation
worker computes each node's once; a SuperNode starts a ClientApp process per message, so it computes them
again in every head round.
"""

from __future__ import annotations

import argparse
import functools
import json
from dataclasses import dataclass
from pathlib import Path

from edge_client.client import decode_download, upload_meta
from hetlora import argtypes
from hetlora.errors import UserError
from hetlora.protocol import atomic
from hetlora.protocol.energy import Power
from hetlora.protocol.plan import ClientPlan
from hetlora.protocol.wire import Adapter, WireFormatError, encode


@dataclass(frozen=True)
class NodeSettings:
    name: str
    data: str
    state_dir: str | None = None
    model_dir: str | None = None
    backend: str = "torch"
    artifacts_dir: str | None = None
    device: str | None = None
    profile_file: str | None = None
    fleet_seed: int | None = None  # simulation: index into simulated_fleet(num-partitions, fleet_seed)
    fleet_size: int = 0
    fleet_index: int = 0
    requested_rank: int | None = None
    watts: float | None = None  # the energy estimates' training power (None: the profile's catalog figure)

    def profile(self) -> dict:
        """The device profile this node reports: simulated, catalog, file, or measured (quick)."""
        if self.fleet_seed is not None:
            return _fleet(self.fleet_size, self.fleet_seed)[self.fleet_index]
        if self.device:
            from profiles.catalog import profile_for

            return profile_for(self.device)
        if self.profile_file:
            from edge_client.cli_client import read_profile_file

            return read_profile_file(self.profile_file)
        from edge_client.device.profile import collect_profile

        return collect_profile(quick=True)

    def power(self, profile: dict) -> Power:
        """The power figure of this node's energy estimates, as `hetlora client` finds it (`watts`, else the
        catalog device `profile` names, else unknown)."""
        from edge_client.device.profile import training_power

        return training_power(self.watts, profile)


@functools.lru_cache(maxsize=2)
def _fleet(size: int, seed: int) -> list[dict]:
    from profiles.catalog import simulated_fleet

    return simulated_fleet(size, seed)


def node_settings(node_config: dict, run_config: dict, node_id: int) -> NodeSettings:
    """NodeSettings from a node config (deployment) or a simulation partition (UserError when incomplete)."""
    def text(key):
        value = node_config.get(key)
        return str(value) if value not in (None, "") else None

    if "data" not in node_config and "partition-id" in node_config:
        index, size = int(node_config["partition-id"]), int(node_config["num-partitions"])
        part_dir = Path(str(run_config.get("partition-dir") or ""))
        try:
            files = json.loads((part_dir / "partition.json").read_text())["clients"]
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"simulation node {index}: run config partition-dir {str(part_dir)!r} holds no "
                            f"partition.json from `hetlora partition` ({exc})") from None
        return NodeSettings(name=f"sim-{index:04d}", data=str(part_dir / files[index % len(files)]["file"]),
                            model_dir=text("model-dir") or str(run_config.get("model") or "") or None,
                            fleet_seed=int(run_config.get("seed", 0)), fleet_size=size, fleet_index=index)
    if text("data") is None:
        raise UserError("this SuperNode has no training data: start it with --node-config \"data='FILE'\"")
    requested = node_config.get("requested-rank")
    return NodeSettings(name=text("name") or f"node-{node_id}", data=text("data"), state_dir=text("state-dir"),
                        model_dir=text("model-dir"), backend=text("backend") or "torch",
                        artifacts_dir=text("artifacts-dir"), device=text("device"), profile_file=text("profile-file"),
                        requested_rank=int(requested) if requested else None, watts=_watts(text("watts")))


def _watts(text: str | None) -> float | None:
    """The node config's `watts` as a number (UserError when it is not a device's training power)."""
    if text is None:
        return None
    try:
        return argtypes.watts(text)
    except argparse.ArgumentTypeError as exc:
        raise UserError(f"node config watts: {exc}") from None


_trainers: dict[tuple, object] = {}  # one per process and run: a simulation actor serves many nodes in turn
# (examples, seq_len) -> (features, labels) under the trainer's frozen model, oldest first
_features: dict[tuple, tuple] = {}
FEATURE_CACHE_BYTES = 256 * 2**20  # at most this much of them (a simulation process serves many nodes)


def _keep_features(key: tuple, value: tuple) -> None:
    """Add one node's frozen features; drop the oldest others while they hold over FEATURE_CACHE_BYTES."""
    _features[key] = value
    while len(_features) > 1 and sum(f.nbytes + y.nbytes for f, y in _features.values()) > FEATURE_CACHE_BYTES:
        del _features[next(iter(_features))]


def _trainer(settings: NodeSettings, model_dir, run: dict):
    """The trainer for this model, backend and run. `train_round` loads everything it trains from the round's
    adapter and reseeds, so nodes that share a process share it."""
    from edge_client.backends import make_trainer

    key = (str(model_dir), settings.backend, settings.artifacts_dir, run["spec_fingerprint"], run["lora_alpha"])
    if key not in _trainers:
        _trainers.clear()
        _features.clear()  # the previous trainer's model computed them
        labels = run.get("labels")
        _trainers[key] = make_trainer(settings.backend, model_dir=model_dir, task=run["task"], labels=labels,
                                      targets=run["targets"], lora_alpha=float(run["lora_alpha"]),
                                      artifacts_dir=settings.artifacts_dir, pooling=run.get("pooling"))
    return _trainers[key]


class LocalNode:
    """One node's data, model check and trainer for a message."""

    def __init__(self, settings: NodeSettings, run: dict):
        from edge_client.data import load_examples
        from edge_client.model_check import check_head
        from edge_client.models import default_model_dir, derive_spec

        self.settings, self.run = settings, run
        model_dir = settings.model_dir or default_model_dir(run["task"])
        labels = run.get("labels")
        self.examples = load_examples(settings.data, run["task"], labels)
        check_head(model_dir, run["task"], len(labels) if labels else None)
        self.spec = derive_spec(model_dir, run["task"], run["targets"], len(labels) if labels else None,
                                pooling=run.get("pooling"))
        if self.spec.fingerprint != run["spec_fingerprint"]:
            raise UserError(f"the local model {model_dir} does not match the server's (spec {self.spec.fingerprint} "
                            f"!= {run['spec_fingerprint']}); use the same base model folder and LoRA targets")
        self.trainer = _trainer(settings, model_dir, run)

    def introduction(self) -> dict:
        """What the server needs to plan for this node (the HTTP registration's fields)."""
        return {"name": self.settings.name, "profile": self.settings.profile(), "n_samples": len(self.examples),
                "requested_rank": self.settings.requested_rank or max(self.run["ranks"])}

    def train(self, payload: bytes, plan: ClientPlan, client_id: str) -> tuple[bytes, dict]:
        """One planned LoRA round: (update wire bytes, report {profile, losses, ranks})."""
        start = self._start(payload, plan)
        result = self.trainer.train_round(start, self.examples, plan.training, rank=plan.rank, mode=plan.mode,
                                          indices=list(plan.indices) if plan.indices is not None else None)
        profile = self.settings.profile()
        result.adapter.meta = upload_meta(plan, client_id, result, self.settings.power(profile))
        body = encode(result.adapter)
        self._keep(plan.round, body)
        return body, {"profile": profile, "rank_before": result.rank_before, "rank_after": result.rank_after,
                      "loss_before": result.loss_before, "loss_after": result.loss_after, "steps": result.steps,
                      "n_samples": result.n_samples}

    def fit_head(self, payload: bytes, plan: ClientPlan, client_id: str) -> tuple[bytes, dict]:
        """A head round: the downloaded head fitted on the frozen features (edge_client.head_fit.fit_plan_head,
        as `hetlora client` does) -> (head wire bytes, report {losses, n_samples})."""
        from edge_client.head_fit import fit_plan_head

        start = self._start(payload, plan, head_only=True)
        features, labels = self.frozen_features(plan.training.seq_len)
        try:
            update, fit = fit_plan_head(self.spec, start, features, labels, plan, plan.training, client_id,
                                        self.settings.power(self.settings.profile()))
        except ValueError as exc:
            raise UserError(f"round {plan.round}: the server's head-fit plan does not fit this run: {exc}") from None
        body = encode(update)
        self._keep(plan.round, body)
        return body, {"loss_before": fit.loss_before, "loss_after": fit.loss_after, "n_samples": len(labels)}

    def head_statistics(self, plan: ClientPlan, client_id: str) -> tuple[bytes, dict]:
        """Round 0: per-class feature statistics of the local data under the frozen base model."""
        from edge_client.head_fit import round_statistics
        from hetlora.protocol.head_stats import encode_statistics

        stats = round_statistics(self.spec, lambda: self.frozen_features(plan.training.seq_len), plan.round,
                                 client_id, self.settings.power(self.settings.profile()))
        body = encode_statistics(stats)
        self._keep(plan.round, body)
        return body, {"n_samples": stats.n_samples}

    def frozen_features(self, seq_len: int) -> tuple:
        """(features, labels) of this node's data under the frozen base model, computed once per process."""
        key = (self.examples, seq_len)
        if key not in _features:
            _keep_features(key, self.trainer.frozen_features(self.examples, seq_len))
        return _features[key]

    def _start(self, payload: bytes, plan: ClientPlan, head_only: bool = False) -> Adapter:
        """The round's global from the message, checked against this run (UserError when it does not fit)."""
        try:
            return decode_download(payload, self.spec, int(self.run["global_rank"]), head_only)
        except WireFormatError as exc:
            raise UserError(f"round {plan.round}: the server's adapter does not fit this run: {exc}") from None

    def _keep(self, round_number: int, body: bytes) -> None:
        """The bytes sent for a round, in state-dir/uploads/ (for audit and for the deployment test)."""
        if self.settings.state_dir:
            atomic.write_bytes(Path(self.settings.state_dir) / "uploads" / f"r{round_number:04d}.safetensors", body)
