"""The rank-tier policy: which LoRA tier a device trains at this round, and why.

`decide_tier(profile, previous)` is a pure function of a device profile document (schema
"hetlora-profile", see edge_client/device/profile.py or profiles.catalog.profile_for), the previous
decision, the adapter spec and the policy (the task's packaged tiers file or a user's). Tiers are ordered by
rank with non-decreasing batch and sequence length, so every cost below grows with the tier and the feasible
tiers are a prefix of the list:

1. memory: predicted peak (profiles.memory_model, for the profile's `compute.training_backend`, torch when
   absent) <= usable bytes * safety factor of the platform; if no tier fits, no-train. The policy's
   `training.activation_checkpointing` ("never", "as-needed", "always"; torch backend only) lets a tier that
   does not fit fit with activation checkpointing, at its step cost (recomputed layers; profiles.cost);
2. compute: local steps per round (the run's) * step time <= round_compute_budget_s; the step time is the measured
   `compute.lora_step_s` (taken at the lowest tier) scaled by FLOPs, else FLOPs (profiles.cost) /
   (sustained GFLOPS, measured or from the catalog, * training_efficiency);
3. upload: adapter bytes at the rank / upload bandwidth <= upload_budget_s, when the bandwidth is known;
4. step down one tier when on battery below battery_min_percent, hot (thermal max_c > hot_c) or throttled;
5. hysteresis: going above the previous tier needs 1-3 to hold with `hysteresis_margin` headroom
   (limits divided by 1 + margin); going down is immediate.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hetlora.errors import UserError
from hetlora.protocol.plan import Tier
from profiles.memory_model import DTYPE_BYTES, OPTIMIZER_SLOTS, ModelShape
from profiles.tier_costs import GB, compute_reason, memory_reason, speed_of, tier_ways, upload_reason

DEFAULT_POLICY_PATH = Path(__file__).with_name("tiers.json")
# The packaged policy per task: a causal LM's tiers size batch and sequence length with the rank.
POLICY_PATHS = {"classification": DEFAULT_POLICY_PATH, "causal-lm": Path(__file__).with_name("tiers-causal-lm.json")}
PLATFORMS = ("jetson", "raspberry-pi", "android", "linux-x86", "other")
CHECKPOINTING = ("never", "as-needed", "always")
THRESHOLDS = ("battery_min_percent", "hot_c", "round_compute_budget_s", "local_steps_per_round",
              "training_efficiency", "upload_budget_s", "hysteresis_margin")


@dataclass
class TierDecision:
    """The tier a device trains at; `reasons` explain every step of the decision."""

    rank: int
    tier: str
    batch_size: int
    seq_len: int
    reasons: list[str] = field(default_factory=list)
    activation_checkpointing: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict) -> "TierDecision":
        try:
            return cls(rank=int(doc["rank"]), tier=str(doc.get("tier", "")), batch_size=int(doc.get("batch_size", 0)),
                       seq_len=int(doc.get("seq_len", 0)), reasons=list(doc.get("reasons", [])),
                       activation_checkpointing=bool(doc.get("activation_checkpointing", False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"a previous tier decision needs an integer 'rank': {exc}") from None


# ---------------------------------------------------------------- policy file


def load_policy(path: str | Path | None = None) -> dict:
    """Read and validate a policy file (default profiles/tiers.json)."""
    path = Path(path) if path else DEFAULT_POLICY_PATH
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise UserError(f"cannot read the tier policy {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"the tier policy {path} is not valid JSON: {exc}") from None
    return validate_policy(doc, str(path))


@functools.cache
def packaged_policy(task: str = "classification") -> dict:
    """The task's packaged policy (POLICY_PATHS), read and checked once per process (callers must not modify it)."""
    if task not in POLICY_PATHS:
        raise UserError(f"no packaged tier policy for task {task!r}; choose one of {', '.join(POLICY_PATHS)}")
    return load_policy(POLICY_PATHS[task])


def validate_policy(doc, source: str = "policy") -> dict:
    """Check a policy document; every error names the field and what a valid value looks like."""
    def fail(msg: str):
        raise UserError(f"{source}: {msg} (see profiles/tiers.json for a valid example)")

    if not isinstance(doc, dict) or doc.get("schema") != "hetlora-tiers":
        fail('not a tier policy: expected a JSON object with "schema": "hetlora-tiers"')
    if doc.get("version") != 1:
        fail(f"unsupported version {doc.get('version')!r}; this code reads version 1")
    tiers = doc.get("tiers")
    if not isinstance(tiers, list) or len(tiers) < 2:
        fail('"tiers" must list the no-train tier and at least one training tier')
    for i, t in enumerate(tiers):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
            fail(f"tiers[{i}] needs a non-empty string 'name'")
        for key in ("rank", "batch_size", "seq_len"):
            if not isinstance(t.get(key), int) or isinstance(t.get(key), bool) or t[key] < 0:
                fail(f"tiers[{i}] ({t['name']}): '{key}' must be a non-negative integer, got {t.get(key)!r}")
        if i > 0 and min(t["rank"], t["batch_size"], t["seq_len"]) < 1:
            fail(f"tiers[{i}] ({t['name']}): a training tier needs rank, batch_size and seq_len >= 1")
    if tiers[0]["rank"] != 0:
        fail(f"tiers[0] must be the no-train tier with rank 0, got rank {tiers[0]['rank']}")
    for i in range(2, len(tiers)):
        a, b = tiers[i - 1], tiers[i]
        if b["rank"] <= a["rank"] or b["batch_size"] < a["batch_size"] or b["seq_len"] < a["seq_len"]:
            fail(f"tiers must be ordered by increasing rank with non-decreasing batch_size and seq_len: "
                 f"{a['name']} ({a['rank']}, {a['batch_size']}, {a['seq_len']}) then "
                 f"{b['name']} ({b['rank']}, {b['batch_size']}, {b['seq_len']})")
    if len({t["name"] for t in tiers}) != len(tiers):
        fail("tier names must be unique")
    th = doc.get("thresholds")
    if not isinstance(th, dict):
        fail('"thresholds" must be an object')
    for key in THRESHOLDS:
        value = th.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            fail(f"thresholds.{key} must be a non-negative number, got {value!r}")
    for key in ("round_compute_budget_s", "local_steps_per_round", "training_efficiency", "upload_budget_s"):
        if th[key] <= 0:
            fail(f"thresholds.{key} must be positive, got {th[key]!r}")
    factors = th.get("memory_safety_factor")
    if not isinstance(factors, dict) or set(factors) != set(PLATFORMS):
        fail(f"thresholds.memory_safety_factor must give a factor for each platform {list(PLATFORMS)}")
    for platform, f in factors.items():
        if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0 < f <= 1:
            fail(f"thresholds.memory_safety_factor.{platform} must be in (0, 1], got {f!r}")
    training = doc.get("training", {})
    if training.get("dtype", "float32") not in DTYPE_BYTES or training.get("optimizer", "adamw") not in OPTIMIZER_SLOTS:
        fail(f"training.dtype must be one of {sorted(DTYPE_BYTES)} and training.optimizer one of {sorted(OPTIMIZER_SLOTS)}")
    if training.get("activation_checkpointing", "never") not in CHECKPOINTING:
        fail(f"training.activation_checkpointing must be one of {', '.join(CHECKPOINTING)}")
    if not isinstance(doc.get("model", {}).get("config"), dict):
        fail('"model.config" must hold the config.json numbers of the model used when none is given')
    return doc


def tiers_of(policy: dict) -> list[Tier]:
    """The policy's tiers, lowest first (rank 0: no-train), as the Tier every part of the run uses."""
    return [Tier(rank=t["rank"], batch_size=t["batch_size"], seq_len=t["seq_len"], name=t["name"])
            for t in policy["tiers"]]


# ---------------------------------------------------------------- the decision


def decide_tier(profile_doc: dict, previous_tier: TierDecision | dict | None = None, *, spec=None,
                policy: dict | None = None, model: ModelShape | None = None, steps: int | None = None) -> TierDecision:
    """The tier for this device (module docstring); `spec` an AdapterSpec, `model` its base model shape, `steps`
    the run's local steps per round (None: the policy's); no `policy`: the packaged one of the spec's task."""
    policy = policy if policy is not None else packaged_policy(spec.task if spec is not None else "classification")
    profile = _check_profile(profile_doc)
    tiers = tiers_of(policy)
    th = dict(policy["thresholds"], **({"local_steps_per_round": steps} if steps else {}))
    model = model or ModelShape.from_config(policy["model"]["config"])
    reasons: list[str] = []

    platform = profile["identity"].get("platform") or "other"
    factor = th["memory_safety_factor"].get(platform, th["memory_safety_factor"]["other"])
    usable = _usable_memory(profile)
    speed = speed_of(profile, tiers)
    upload_mbps = (profile.get("network") or {}).get("upload_mbps")
    backend = (profile.get("compute") or {}).get("training_backend") or "torch"
    if usable is None:
        return _decision(tiers[0], reasons + ["memory: usable memory unknown (the profile has no memory figures); "
                                               "not training"])
    options, costs = tier_ways(tiers, model, spec, policy, speed, upload_mbps, backend, usable * factor)

    def feasible(headroom: float) -> int:
        """Index of the largest tier that some way of training fits within the limits / headroom."""
        best = 0
        for i in range(1, len(tiers)):
            if not any(c.fits(usable * factor, th, headroom) for c in options[i]):
                break
            best = i
        return best

    reasons.append(memory_reason(tiers, costs, usable, factor, backend))
    if costs[1].memory > usable * factor:
        return _decision(tiers[0], reasons + ["no-train: the smallest tier does not fit in memory"])
    reasons.append(compute_reason(tiers, costs, th, speed))
    if upload_mbps:
        reasons.append(upload_reason(tiers, costs, th, upload_mbps))
    else:
        reasons.append("upload: bandwidth unknown; not limiting the rank")

    candidate, with_margin = feasible(1.0), feasible(1.0 + th["hysteresis_margin"])
    if candidate == 0:
        return _decision(tiers[0], reasons + [f"no-train: {tiers[1].name} does not fit the round's budgets"])
    reasons.append(f"fits: {tiers[candidate].name} (rank {tiers[candidate].rank}) is the largest tier within "
                   "memory, compute and upload limits")

    stress = _stress(profile, th)
    if stress:
        candidate, with_margin = candidate - 1, max(with_margin - 1, 0)
        reasons.append(f"step down {tiers[candidate + 1].name} -> {tiers[candidate].name}: " + "; ".join(stress))

    chosen = candidate
    if previous_tier is not None:
        chosen = _hysteresis(tiers, candidate, with_margin, _tier_index(tiers, previous_tier), th, reasons)
    checkpointed = chosen > 0 and _checkpointed(tiers[chosen], options[chosen], usable * factor, th, reasons)
    return _decision(tiers[chosen], reasons, checkpointed)


def _checkpointed(tier: Tier, ways: list, budget: float, th: dict, reasons: list[str]) -> bool:
    """Whether the chosen tier's first way of training that fits uses activation checkpointing (said in `reasons`)."""
    way = next(c for c in ways if c.fits(budget, th))
    if way.checkpointed:
        reasons.append(f"activation checkpointing: {tier.name} trains with it ({way.memory / GB:.2f} GB "
                       f"instead of {ways[0].memory / GB:.2f} GB; layers are recomputed in backward)")
    return way.checkpointed


def _check_profile(doc) -> dict:
    if not isinstance(doc, dict) or doc.get("schema") != "hetlora-profile":
        raise UserError('not a device profile: expected a JSON object with "schema": "hetlora-profile" '
                        "(produce one with `hetlora profile --json`)")
    if doc.get("version") != 1:
        raise UserError(f"device profile version {doc.get('version')!r} is not supported; this code reads version 1")
    for dotted, kinds in _PROFILE_FIELDS.items():
        section, key = dotted.split(".")
        if not isinstance(doc.get(section) or {}, dict):
            raise UserError(f"device profile field {section} must be an object or null, got {doc[section]!r}")
        value = (doc.get(section) or {}).get(key)
        if value is not None and (not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))):
            raise UserError(f"device profile field {dotted} must be {' or '.join(k.__name__ for k in kinds)} "
                            f"or null, got {str(value)[:40]}")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not abs(value) <= _MAX_NUMBER:
            raise UserError(f"device profile field {dotted} must be a finite number of magnitude at most "
                            f"{_MAX_NUMBER:g}, got {str(value)[:40]}")
    reasons = (doc.get("cpu") or {}).get("throttle_reasons")
    if reasons is not None and not (isinstance(reasons, list) and all(isinstance(r, str) for r in reasons)):
        raise UserError(f"device profile field cpu.throttle_reasons must be a list of strings or null, "
                        f"got {str(reasons)[:40]}")
    return {**doc, "identity": doc.get("identity") or {}}


_MAX_NUMBER = 1e18  # no measured quantity comes near it; NaN and +-Inf fail `abs(v) <= _MAX_NUMBER` too
# The profile fields the policy reads, and the JSON types each may have besides null.
_PROFILE_FIELDS = {
    "identity.platform": (str,), "identity.catalog_id": (str,),
    "memory.usable_bytes": (int, float), "memory.available_bytes": (int, float),
    "memory.cgroup_limit_bytes": (int, float),
    "compute.lora_step_s": (int, float), "compute.sustained_gflops": (int, float), "compute.training_backend": (str,),
    "battery.present": (bool,), "battery.plugged": (bool,), "battery.percent": (int, float),
    "thermal.max_c": (int, float), "cpu.throttled": (bool,), "network.upload_mbps": (int, float),
}


def _usable_memory(profile: dict) -> int | None:
    mem = profile.get("memory") or {}
    for key in ("usable_bytes", "available_bytes"):
        if mem.get(key) is not None:
            limit = mem.get("cgroup_limit_bytes")
            return min(int(mem[key]), int(limit)) if limit else int(mem[key])
    return None


def _stress(profile: dict, th: dict) -> list[str]:
    """Why the device should do less this round: low battery off the charger, heat, throttling."""
    out = []
    battery = profile.get("battery") or {}
    pct = battery.get("percent")
    if battery.get("present") and pct is not None and not battery.get("plugged") and pct < th["battery_min_percent"]:
        out.append(f"on battery at {pct:g}% < {th['battery_min_percent']:g}%")
    max_c = (profile.get("thermal") or {}).get("max_c")
    if max_c is not None and max_c > th["hot_c"]:
        out.append(f"hot: {max_c:g} °C > {th['hot_c']:g} °C")
    cpu = profile.get("cpu") or {}
    if cpu.get("throttled"):
        why = ", ".join(cpu.get("throttle_reasons") or []) or "reported by the profiler"
        out.append(f"CPU throttled ({why})")
    return out


def _tier_index(tiers: list[Tier], previous) -> int:
    """Index of the previous decision's tier: the largest tier whose rank does not exceed its rank
    (the lowest training tier for a training rank below every tier's, e.g. a server's rank 2)."""
    prev = previous if isinstance(previous, TierDecision) else TierDecision.from_json(previous)
    if prev.rank <= 0:
        return 0
    return max([1] + [i for i, t in enumerate(tiers) if 0 < t.rank <= prev.rank])


def _hysteresis(tiers, candidate: int, with_margin: int, prev: int, th: dict, reasons: list[str]) -> int:
    pct = f"{100 * th['hysteresis_margin']:g}%"
    if candidate < prev:
        reasons.append(f"hysteresis: moving down from {tiers[prev].name} to {tiers[candidate].name} immediately")
        return candidate
    if candidate == prev:
        reasons.append(f"hysteresis: staying at {tiers[prev].name} (previous tier)")
        return prev
    chosen = max(prev, min(candidate, with_margin))
    if chosen == prev:
        reasons.append(f"hysteresis: {tiers[candidate].name} fits but not with {pct} headroom; "
                       f"staying at {tiers[prev].name} (previous tier)")
    else:
        reasons.append(f"hysteresis: moving up from {tiers[prev].name} to {tiers[chosen].name} "
                       f"(fits with {pct} headroom)")
    return chosen


def _decision(t: Tier, reasons: list[str], activation_checkpointing: bool = False) -> TierDecision:
    return TierDecision(rank=t.rank, tier=t.name, batch_size=t.batch_size, seq_len=t.seq_len, reasons=reasons,
                        activation_checkpointing=activation_checkpointing)
