"""What one tier of the rank-tier policy costs on a device, and the reasons that state it (profiles.policy decides).

Per tier and way of training (without or with activation checkpointing): predicted peak memory
(profiles.memory_model for the device's training backend), step time (a measured step at the lowest tier scaled
by FLOPs, else FLOPs over sustained GFLOPS * training_efficiency; profiles.cost) and upload time.
"""

from __future__ import annotations

from dataclasses import dataclass

from hetlora.protocol.plan import Tier
from profiles import cost
from profiles.catalog import device
from profiles.memory_model import ModelShape, predict_peak_memory

GB = 1e9


def tier_ways(tiers: list[Tier], model: ModelShape, spec, policy: dict, speed: "Speed", upload_mbps, backend: str,
              budget: float) -> tuple[list, list]:
    """(ways, judged): per tier (index 0, no-train: None), its ways of training in order of preference (without,
    then with activation checkpointing) and the way its memory is judged by (the first within `budget` bytes,
    else the leanest)."""
    ways = [None] + [[tier_costs(t, tiers[1], model, spec, policy, speed, upload_mbps, backend, checkpointed)
                      for checkpointed in checkpointing_options(policy, backend)] for t in tiers[1:]]
    judged = [None] + [next((c for c in opts if c.memory <= budget), opts[-1]) for opts in ways[1:]]
    return ways, judged


@dataclass(frozen=True)
class TierCosts:
    """What one training tier needs on this device, with or without activation checkpointing."""

    memory: int
    step_s: float | None
    upload_s: float | None
    checkpointed: bool = False

    def fits(self, memory_budget: float, th: dict, headroom: float = 1.0) -> bool:
        """Memory, compute and upload within the limits / headroom."""
        return (self.memory * headroom <= memory_budget
                and (self.step_s is None or th["local_steps_per_round"] * self.step_s * headroom
                     <= th["round_compute_budget_s"])
                and (self.upload_s is None or self.upload_s * headroom <= th["upload_budget_s"]))


@dataclass(frozen=True)
class Speed:
    """How step time is known: a measured step at the lowest tier, a GFLOPS figure, or not at all."""

    step_s: float | None = None
    gflops: float | None = None
    source: str = ""


def speed_of(profile: dict, tiers: list[Tier]) -> Speed:
    """The profile's measured LoRA step, else its measured or catalog GFLOPS, else nothing."""
    compute = profile.get("compute") or {}
    if compute.get("lora_step_s"):
        return Speed(step_s=float(compute["lora_step_s"]), source=f"measured LoRA step at {tiers[1].name}")
    if compute.get("sustained_gflops"):
        where = "catalog estimate" if compute.get("source") == "catalog" else "measured"
        return Speed(gflops=float(compute["sustained_gflops"]), source=f"{where} sustained GFLOPS")
    catalog_id = profile["identity"].get("catalog_id")
    if catalog_id:
        return Speed(gflops=float(device(catalog_id)["compute"]["sustained_gflops"]),
                     source=f"catalog GFLOPS of {catalog_id}")
    return Speed()


def lora_params(t: Tier, model: ModelShape, spec) -> tuple[int, int, int]:
    """(LoRA parameters, adapted modules, dense parameters) at tier t."""
    if spec is not None:
        return spec.lora_parameter_count(t.rank), len(spec.modules), spec.dense_parameter_count()
    return model.default_lora_params(t.rank), model.layers * len(model.default_lora_modules()), 0


def checkpointing_options(policy: dict, backend: str) -> list[bool]:
    """The ways a tier may train, in order of preference: False without activation checkpointing, True with it
    (the policy's `training.activation_checkpointing`; the torch backend only)."""
    mode = policy.get("training", {}).get("activation_checkpointing", "never")
    if backend != "torch" or mode == "never":
        return [False]
    return [True] if mode == "always" else [False, True]


def tier_costs(t: Tier, lowest: Tier, model: ModelShape, spec, policy: dict, speed: Speed, upload_mbps, backend: str,
               checkpointed: bool = False) -> TierCosts:
    """Tier t's memory, step time and upload time on this device, with or without activation checkpointing
    (a measured step is the `lowest` tier's, scaled by FLOPs)."""
    lora, modules, dense = lora_params(t, model, spec)
    memory = predict_peak_memory(model, t.rank, t.batch_size, t.seq_len, lora_params=lora, lora_modules=modules,
                                 dense_params=dense, dtype=policy.get("training", {}).get("dtype", "float32"),
                                 optimizer=policy.get("training", {}).get("optimizer", "adamw"),
                                 task=spec.task if spec is not None else policy["model"].get("task", "classification"),
                                 backend=backend, activation_checkpointing=checkpointed).total
    flops = cost.step_flops(model, t.batch_size, t.seq_len, lora, checkpointed)
    if speed.step_s is not None:
        step_s = speed.step_s * flops / cost.step_flops(model, lowest.batch_size, lowest.seq_len,
                                                         lora_params(lowest, model, spec)[0])
    elif speed.gflops is not None:
        step_s = cost.step_seconds(flops, speed.gflops, policy["thresholds"]["training_efficiency"])
    else:
        step_s = None
    upload_s = cost.upload_seconds(cost.upload_bytes(lora, dense), upload_mbps) if upload_mbps else None
    return TierCosts(memory, step_s, upload_s, checkpointed)


def memory_reason(tiers, costs, usable, factor, backend: str) -> str:
    budget = usable * factor
    fits = [i for i in range(1, len(tiers)) if costs[i].memory <= budget]
    i = fits[-1] if fits else 1
    t, sign = tiers[i], "≥" if fits else "<"
    text = (f"memory: {usable / GB:.2f} GB usable × {factor} {sign} {costs[i].memory / GB:.2f} GB predicted "
            f"for rank {t.rank} batch {t.batch_size} seq {t.seq_len} on {backend}{_how(costs[i])}")
    if fits and i < len(tiers) - 1:
        nxt = tiers[i + 1]
        text += (f"; {nxt.name} needs {costs[i + 1].memory / GB:.2f} GB (batch {nxt.batch_size} seq {nxt.seq_len}"
                 f"{_how(costs[i + 1])})")
    return text


def _how(c: TierCosts) -> str:
    return " with activation checkpointing" if c.checkpointed else ""


def compute_reason(tiers, costs, th, speed: Speed) -> str:
    if speed.source == "":
        return "compute: no measured step time or GFLOPS figure; not limiting the rank"
    steps, budget = th["local_steps_per_round"], th["round_compute_budget_s"]
    fits = [i for i in range(1, len(tiers)) if steps * costs[i].step_s <= budget]
    i = fits[-1] if fits else 1
    how = (f"{speed.gflops:g} GFLOPS × {th['training_efficiency']} efficiency ({speed.source})"
           if speed.gflops is not None else f"{speed.step_s:g} s ({speed.source}) scaled by FLOPs")
    text = (f"compute: {tiers[i].name} needs {steps} steps × {costs[i].step_s:.2f} s = "
            f"{steps * costs[i].step_s:.0f} s {'≤' if fits else '>'} {budget:g} s budget at {how}")
    if fits and i < len(tiers) - 1:
        text += f"; {tiers[i + 1].name} would need {steps * costs[i + 1].step_s:.0f} s"
    return text


def upload_reason(tiers, costs, th, upload_mbps) -> str:
    budget = th["upload_budget_s"]
    fits = [i for i in range(1, len(tiers)) if costs[i].upload_s <= budget]
    i = fits[-1] if fits else 1
    return (f"upload: {tiers[i].name} adapter takes {costs[i].upload_s:.1f} s at {upload_mbps:g} Mbit/s "
            f"{'≤' if fits else '>'} {budget:g} s budget")
