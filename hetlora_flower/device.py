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

A round is the HTTP client's own device round (edge_client.local_round: the plan read and checked as the client
reads it, LocalRound with the plan's rank, indices, mode and training settings, self-pruning and Select-N-Fold, the
same metadata on the update with the training seconds and the energy estimate at `NodeSettings.power`); the rank a
node asks for and an artifact export's check of the run are the client's too. The node reports a fresh device
profile with every LoRA update; the server re-decides its tier from it for the next round.
`LocalNodes` keeps each node's data, trainer and frozen features between the messages a process serves: a
simulation worker loads each node's once; a SuperNode that starts a ClientApp process per message loads
them again for every message.
"""

from __future__ import annotations

import argparse
import functools
import json
from dataclasses import dataclass
from pathlib import Path

from edge_client.local_round import LocalModel, LocalRound, PlanMismatch, read_plan
from hetlora import argtypes
from hetlora.errors import UserError
from hetlora.protocol import atomic
from hetlora.protocol.energy import Power
from profiles.catalog import profile_for, simulated_fleet
from edge_client.cli_client import read_profile_file
from edge_client.device.profile import collect_profile, training_power
from edge_client.data import load_examples
from hetlora.models.bundled import default_model_dir


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
            return profile_for(self.device)
        if self.profile_file:
            return read_profile_file(self.profile_file)

        return collect_profile(quick=True)

    def power(self, profile: dict) -> Power:
        """The power figure of this node's energy estimates, as `hetlora client` finds it (`watts`, else the
        catalog device `profile` names, else unknown)."""
        return training_power(self.watts, profile)


@functools.lru_cache(maxsize=2)
def _fleet(size: int, seed: int) -> list[dict]:
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


FEATURE_CACHE_BYTES = 256 * 2**20  # the frozen features a process keeps, at most (a simulation serves many nodes)


class LocalNode:
    """One node's LocalModel (data loaded once, model checked against the run, trainer, frozen features) and
    its settings; `answer` does one planned round."""

    def __init__(self, settings: NodeSettings, local: LocalModel):
        self.settings, self.local = settings, local

    def introduction(self) -> dict:
        """What the server needs to plan for this node (the HTTP registration's fields)."""
        return {"name": self.settings.name, "profile": self.local.profile_for_server(self.settings.profile()),
                "n_samples": len(self.local.examples),
                "requested_rank": self.local.request_rank(self.settings.requested_rank)}

    def answer(self, payload: bytes | None, plan_doc: dict, client_id: str) -> tuple[bytes, dict]:
        """One planned round (edge_client.local_round: the plan document read as the HTTP client reads it) -> (the
        wire bytes to send, the report; a LoRA round's carries the node's fresh profile). UserError when the
        server's plan or adapter does not fit the run."""
        profile = self.local.profile_for_server(self.settings.profile())
        try:
            plan = read_plan(plan_doc)
            start = None if plan.mode == "head-statistics" else self.local.start(payload, plan)
            output = LocalRound(self.local, plan, plan.training, client_id, self.settings.power(profile)).run(start)
        except PlanMismatch as exc:
            raise UserError(str(exc)) from None
        self._keep(plan.round, output.body)
        lora = plan.mode not in ("head-statistics", "head-fit")
        return output.body, output.report | ({"profile": profile} if lora else {})

    def _keep(self, round_number: int, body: bytes) -> None:
        """The bytes sent for a round, in state-dir/uploads/ (for audit and for the deployment test)."""
        if self.settings.state_dir:
            atomic.write_bytes(Path(self.settings.state_dir) / "uploads" / f"r{round_number:04d}.safetensors", body)


class LocalNodes:
    """The nodes one ClientApp process serves, kept between its messages: a SuperNode's one node, or the many a
    simulation process trains in turn. They share one trainer per (model, backend, run): `train_round` loads
    everything it trains from the round's adapter and reseeds. A node's data is loaded once; the oldest nodes
    are dropped while their frozen features hold over `max_feature_bytes`."""

    def __init__(self, max_feature_bytes: int = FEATURE_CACHE_BYTES):
        self.max_feature_bytes = max_feature_bytes
        self._trainer_key, self._trainer = None, None
        self._nodes: dict[tuple, LocalNode] = {}

    def node(self, settings: NodeSettings, run: dict) -> LocalNode:
        model_dir = settings.model_dir or default_model_dir(run["task"])
        trainer_key = (str(model_dir), settings.backend, settings.artifacts_dir, run["spec_fingerprint"],
                       run["lora_alpha"])
        if trainer_key != self._trainer_key:
            self._nodes.clear()  # their features came from the previous trainer's model
            self._trainer_key, self._trainer = None, None
        key = (settings, run["spec_fingerprint"])
        if key not in self._nodes:
            examples = load_examples(settings.data, run["task"], run.get("labels"))
            local = LocalModel(run, examples, model_dir, backend=settings.backend,
                               artifacts_dir=settings.artifacts_dir, trainer=self._trainer)
            self._trainer_key, self._trainer = trainer_key, local.trainer
            self._nodes[key] = LocalNode(settings, local)
        self._nodes[key] = self._nodes.pop(key)  # the newest last
        while len(self._nodes) > 1 and sum(n.local.features_bytes for n in self._nodes.values()) > \
                self.max_feature_bytes:
            del self._nodes[next(iter(self._nodes))]
        return self._nodes[key]
