"""The device profile document ("hetlora-profile", version 1) that the tier policy consumes.

Fields that cannot be read are null, never guessed. `quick` skips the compute measurements
(seconds; clients re-profile between rounds); `full` runs them long enough to see throttling;
`step` also times one real LoRA training step at the lowest tier.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path

from edge_client.device import compute
from edge_client.device.battery import battery_temperature_c, read_battery
from edge_client.device.cpu import FrequencyWatcher, read_cpu
from edge_client.device.host import Host, Runner
from edge_client.device.identity import read_identity
from edge_client.device.memory import read_memory
from edge_client.device.sources import discover_sources
from edge_client.device.thermal import read_thermal
from hetlora.errors import UserError
from hetlora.protocol.energy import Power
from profiles.catalog import device, match_catalog_id
from profiles.policy import load_policy, packaged_policy, tiers_of

SCHEMA, VERSION = "hetlora-profile", 1
SECTIONS = ("identity", "cpu", "memory", "battery", "power_sources", "thermal", "compute", "network")
LOWEST_TIER = {"rank": 4, "batch_size": 8, "seq_len": 64}  # used when the tier policy is not installed


def _installed(module: str) -> bool:
    """Whether profiles.<module> (the tier-policy engineer's package) is importable."""
    return importlib.util.find_spec("profiles") is not None and importlib.util.find_spec(f"profiles.{module}") is not None


def match_catalog(identity: dict) -> str | None:
    """The catalog device this identity matches (profiles.catalog), or None."""
    if not _installed("catalog"):
        return None

    return match_catalog_id(identity)


def catalog_power_figure(catalog_id: str | None) -> dict | None:
    """{"idle_w", "load_w"} of a catalog device (its typical training power), or None."""
    if not catalog_id or not _installed("catalog"):
        return None

    power = device(catalog_id)["power"]
    return {"idle_w": power["idle_w"], "load_w": power["typical_training_w"]}


def training_power(watts: float | None, profile: dict) -> Power:
    """The power figure of this device's energy estimates: `watts` (`--watts`) when given, else the catalog's
    `power.typical_training_w` of the device the profile names (identity.catalog_id, else matched by its model
    string), else unknown."""
    if watts is not None:
        return Power(float(watts), "--watts")
    identity = (profile or {}).get("identity") or {}
    catalog_id = identity.get("catalog_id") or match_catalog(identity)
    try:
        figure = catalog_power_figure(catalog_id)
    except UserError:  # a profile file naming a device this catalog does not have
        figure = None
    return Power(float(figure["load_w"]), f"catalog:{catalog_id}") if figure else Power()


def lowest_tier(policy_file=None, task: str = "classification") -> dict:
    """Rank, batch size and sequence length of the lowest training tier of the policy
    (`policy_file`, default the task's installed tiers file)."""
    if not _installed("policy"):
        return dict(LOWEST_TIER)

    policy = load_policy(policy_file) if policy_file else packaged_policy(task)
    tier = [t for t in tiers_of(policy) if t.rank > 0][0]
    return {"rank": tier.rank, "batch_size": tier.batch_size, "seq_len": tier.seq_len}


def measure_compute(host: Host, *, full: bool, step: bool, model_dir=None,
                    policy_file=None, task: str = "classification") -> tuple[dict, dict[str, int]]:
    """The "compute" section, and the highest clock per CPU seen during the matmul load."""
    with FrequencyWatcher(host) as watcher:
        section = compute.matmul_gflops(**(compute.FULL if full else compute.SHORT))
    section["lora_step_s"] = round(compute.lora_step_seconds(model_dir, task, **lowest_tier(policy_file, task)), 4) \
        if step else None
    return section, watcher.peaks_khz


def collect_profile(root: str | os.PathLike = "/", quick: bool = False, *, full: bool = False, step: bool = False,
                    model_dir=None, policy_file=None, task: str = "classification", env: Mapping[str, str] | None = None,
                    runner: Runner | None = None) -> dict:
    """Measure this device (or the fake tree at `root`) and return the profile document.

    The LoRA step (`step`) trains the `task`'s model at the lowest tier of the policy in `policy_file` (default
    the task's installed one)."""
    host = Host(Path(root), dict(os.environ if env is None else env), runner)
    compute_section, peaks = (None, None) if quick else measure_compute(host, full=full, step=step,
                                                                        model_dir=model_dir, policy_file=policy_file,
                                                                        task=task)
    identity = read_identity(host)
    identity["catalog_id"] = match_catalog(identity)
    return {
        "schema": SCHEMA,
        "version": VERSION,
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "quick": quick,
        "identity": identity,
        "cpu": read_cpu(host, peaks),
        "memory": read_memory(host),
        "battery": read_battery(host),
        "power_sources": [s.describe() for s in discover_sources(host)],
        "thermal": read_thermal(host, battery_temperature_c(host)),
        "compute": compute_section,
        "network": {"upload_mbps": None, "download_mbps": None},
    }


def with_training_backend(doc: dict, backend: str) -> dict:
    """`doc` with compute.training_backend set: the tier policy predicts this backend's training memory."""
    return {**doc, "compute": {**(doc.get("compute") or {}), "training_backend": backend}}


def validate_profile(doc) -> list[str]:
    """Problems that make `doc` not a version-1 profile document (empty when it is one)."""
    if not isinstance(doc, dict):
        return ["a profile is a JSON object"]
    problems = []
    if doc.get("schema") != SCHEMA or doc.get("version") != VERSION:
        problems.append(f'expected "schema": "{SCHEMA}" and "version": {VERSION}')
    problems += [f"missing section {name!r}" for name in SECTIONS if name not in doc]
    for name in SECTIONS:
        if name in doc and doc[name] is not None and not isinstance(doc[name], list if name == "power_sources" else dict):
            problems.append(f"section {name!r} has the wrong type")
    return problems
