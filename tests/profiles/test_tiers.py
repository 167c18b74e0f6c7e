"""The tier policy on profile documents of each platform, the policy file, the memory and cost models.

References independent of the code under test: autograd's own saved-tensor count and torch's
FlopCounterMode on real (tiny) transformers models, parameter counts of real models, and closed-form
upload sizes.
"""

from __future__ import annotations

import copy
import itertools
import json

import pytest

from hetlora.protocol.spec import AdapterSpec, LoRAModule
from hetlora.errors import UserError
from profiles import cost
from profiles.catalog import list_devices, profile_for
from profiles.memory_model import ModelShape, predict_peak_memory, saved_activation_bytes
from profiles.policy import TierDecision, decide_tier, load_policy, tiers_of, validate_policy

POLICY = load_policy()
MINILM = ModelShape.from_config(POLICY["model"]["config"])
GB = 1e9


def make_profile(platform="linux-x86", usable_gb=8.0, *, gflops=None, step_s=None, battery=None, max_c=45.0,
                 throttled=False, throttle_reasons=(), upload_mbps=None, jetpack=None, available_gb=None,
                 cgroup_gb=None, model="test device"):
    """A "hetlora-profile" document as the profiler writes it (null where a field cannot be read)."""
    return {
        "schema": "hetlora-profile", "version": 1, "created": "2026-11-22T05:10:00Z", "quick": gflops is None,
        "identity": {"platform": platform, "model": model, "vendor": None, "arch": "aarch64", "os": "Linux 6.1",
                     "jetpack": jetpack, "catalog_id": None},
        "cpu": {"cores": 4, "freq_mhz": 1500.0, "max_freq_mhz": 1800.0, "throttled": throttled,
                "throttle_reasons": list(throttle_reasons)},
        "memory": {"total_bytes": 16 * GB, "available_bytes": (available_gb or usable_gb or 0) * GB or None,
                   "cgroup_limit_bytes": cgroup_gb * GB if cgroup_gb else None,
                   "usable_bytes": usable_gb * GB if usable_gb else None},
        "battery": battery or {"present": False, "percent": None, "plugged": None, "charging": None,
                               "power_w": None, "source": "none"},
        "power_sources": [],
        "thermal": {"zones": {"cpu-thermal": max_c}, "max_c": max_c},
        "compute": None if gflops is None and step_s is None else
        {"peak_gflops": gflops, "sustained_gflops": gflops, "duration_s": 3.0, "lora_step_s": step_s},
        "network": {"upload_mbps": upload_mbps, "download_mbps": None},
    }


def on_battery(percent, plugged=False):
    return {"present": True, "percent": percent, "plugged": plugged, "charging": plugged, "power_w": 3.0,
            "source": "sysfs"}


def memory_of(tier_name: str) -> int:
    t = next(t for t in tiers_of(POLICY) if t.name == tier_name)
    return predict_peak_memory(MINILM, t.rank, t.batch_size, t.seq_len).total


def step_flops_of(tier_name: str) -> float:
    t = next(t for t in tiers_of(POLICY) if t.name == tier_name)
    return cost.step_flops(MINILM, t.batch_size, t.seq_len, MINILM.default_lora_params(t.rank))


def has_reason(decision: TierDecision, *fragments: str) -> bool:
    return any(all(f in r for f in fragments) for r in decision.reasons)


# --- one profile per platform -------------------------------------------------------------------------

PLATFORM_CASES = {
    # Jetson Nano on JetPack 4: 2.4 GB usable x 0.6 holds 16x64 but not 16x128; 8 GFLOPS measured.
    "jetson-jp4": (make_profile("jetson", 2.4, gflops=8.0, jetpack="R32.7.4", model="NVIDIA Jetson Nano Developer Kit"),
                   "r16", ["memory:", "compute:"]),
    "jetson-jp5-6": (make_profile("jetson", 6.0, gflops=25.0, jetpack="R36.3.0",
                                  model="NVIDIA Jetson Orin Nano Developer Kit"), "r64", ["fits: r64"]),
    # Pi 4 with a measured LoRA step at the lowest tier: the step time, scaled by FLOPs, caps the rank.
    "raspberry-pi-4": (make_profile("raspberry-pi", 3.3, step_s=4.0, model="Raspberry Pi 4 Model B Rev 1.4"),
                       "r16", ["measured LoRA step at r4"]),
    "raspberry-pi-5-undervolted": (make_profile("raspberry-pi", 7.5, gflops=30.0, throttled=True,
                                                throttle_reasons=["under-voltage"], model="Raspberry Pi 5 Model B"),
                                   "r32", ["step down r64 -> r32", "under-voltage"]),
    "android-low-battery": (make_profile("android", 2.8, gflops=28.0, battery=on_battery(25.0), model="SM-A546B"),
                            "r8", ["step down r16 -> r8", "on battery at 25%"]),
    "x86-laptop-slow-uplink": (make_profile("linux-x86", 10.0, gflops=80.0, battery=on_battery(90.0),
                                            upload_mbps=1.0, model="ThinkPad T14 Gen 3"), "r16", ["upload: r16"]),
    "container-cgroup-512MB": (make_profile("linux-x86", None, gflops=50.0, available_gb=20.0, cgroup_gb=0.5),
                               "no-train", ["memory: 0.50 GB usable", "no-train"]),
}


@pytest.mark.parametrize("case", sorted(PLATFORM_CASES))
def test_platform_profiles_get_their_tier_with_reasons(case):
    profile, expected, fragments = PLATFORM_CASES[case]
    decision = decide_tier(profile)
    assert decision.tier == expected, decision.reasons
    for fragment in fragments:
        assert has_reason(decision, fragment), (fragment, decision.reasons)
    tier = next(t for t in tiers_of(POLICY) if t.name == expected)
    assert (decision.rank, decision.batch_size, decision.seq_len) == (tier.rank, tier.batch_size, tier.seq_len)


def test_memory_limit_is_where_the_memory_model_says():
    """Usable memory just above / below a tier's predicted peak (x the Jetson factor) flips that tier; compute is
    fast enough never to limit. Above: the largest of the smallest-first tiers the memory model says fit."""
    factor = POLICY["thresholds"]["memory_safety_factor"]["jetson"]
    training = tiers_of(POLICY)[1:]
    for tier, below in (("r16", "r8"), ("r4", "no-train")):
        need = memory_of(tier) / factor / GB
        fitting = list(itertools.takewhile(lambda t: memory_of(t.name) <= need * 1.01 * factor * GB, training))
        assert tier in [t.name for t in fitting]
        assert decide_tier(make_profile("jetson", need * 1.01, gflops=1e6)).tier == fitting[-1].name
        assert decide_tier(make_profile("jetson", need * 0.99, gflops=1e6)).tier == below


def test_no_train_when_memory_is_too_small_or_unknown():
    tiny = decide_tier(make_profile("raspberry-pi", 0.3, gflops=10.0))
    assert tiny.rank == 0 and tiny.tier == "no-train" and has_reason(tiny, "smallest tier does not fit")
    unknown = decide_tier(make_profile("other", None, gflops=10.0))
    assert unknown.rank == 0 and has_reason(unknown, "usable memory unknown")


def test_compute_budget_caps_the_rank_at_the_closed_form_boundary():
    """The largest tier with steps x FLOPs / (GFLOPS x efficiency) <= budget, checked tier by tier."""
    th = POLICY["thresholds"]
    for gflops in (2.0, 6.0, 9.0, 15.0, 40.0):
        decision = decide_tier(make_profile("linux-x86", 30.0, gflops=gflops))
        fits = [t.name for t in tiers_of(POLICY)[1:]
                if th["local_steps_per_round"] * step_flops_of(t.name) / (gflops * 1e9 * th["training_efficiency"])
                <= th["round_compute_budget_s"]]
        assert decision.tier == (fits[-1] if fits else "no-train"), (gflops, decision.reasons)


@pytest.mark.parametrize("stress", [
    {"battery": on_battery(10.0)}, {"max_c": 85.0}, {"throttled": True},
    {"battery": on_battery(10.0), "max_c": 85.0, "throttled": True},
])
def test_battery_heat_or_throttling_step_down_exactly_one_tier(stress):
    calm = decide_tier(make_profile("android", 30.0, gflops=1000.0))
    stressed = decide_tier(make_profile("android", 30.0, gflops=1000.0, **stress))
    assert calm.tier == "r64" and stressed.tier == "r32"
    assert has_reason(stressed, "step down r64 -> r32")


def test_no_step_down_on_the_charger_or_when_cool():
    plugged = decide_tier(make_profile("android", 30.0, gflops=1000.0, battery=on_battery(10.0, plugged=True)))
    healthy = decide_tier(make_profile("android", 30.0, gflops=1000.0, battery=on_battery(80.0), max_c=60.0))
    assert plugged.tier == healthy.tier == "r64"


def test_step_down_from_the_lowest_tier_is_no_train():
    """0.25 Mbit/s uploads an r4 adapter (0.66 MB) within 30 s but not an r8 one; low battery then means no-train."""
    decision = decide_tier(make_profile("android", 30.0, gflops=1000.0, upload_mbps=0.25, battery=on_battery(5.0)))
    assert decision.tier == "no-train" and has_reason(decision, "step down r4 -> no-train")


def minilm_spec() -> AdapterSpec:
    modules = {}
    for layer in range(6):
        for name, (i, o) in {"query": (384, 384), "key": (384, 384), "value": (384, 384),
                             "attention.output.dense": (384, 384), "intermediate.dense": (384, 1536),
                             "output.dense": (1536, 384)}.items():
            full = f"bert.encoder.layer.{layer}.{name}"
            modules[full] = LoRAModule(full, i, o)
    return AdapterSpec("hash", "classification", ("query",), modules, {"classifier.weight": (77, 384),
                                                                       "classifier.bias": (77,)})


@pytest.mark.parametrize("mbps", [0.5, 1.0, 3.0, 100.0])
def test_upload_budget_uses_the_adapter_size(mbps):
    """Closed form: bytes = 4 * (r * sum(in + out) + dense); seconds = 8 * bytes / (Mbit/s * 1e6)."""
    spec = minilm_spec()
    per_rank = sum(m.in_features + m.out_features for m in spec.modules.values())
    dense = 77 * 384 + 77
    budget = POLICY["thresholds"]["upload_budget_s"]
    fits = [t.name for t in tiers_of(POLICY)[1:] if 8 * 4 * (t.rank * per_rank + dense) / (mbps * 1e6) <= budget]
    decision = decide_tier(make_profile("linux-x86", 30.0, gflops=1000.0, upload_mbps=mbps), spec=spec)
    assert decision.tier == (fits[-1] if fits else "no-train"), decision.reasons
    assert has_reason(decision, "upload:")


# --- hysteresis ---------------------------------------------------------------------------------------

def boundary_gflops() -> float:
    """GFLOPS at which r64's local steps exactly fill the round's compute budget."""
    th = POLICY["thresholds"]
    return (th["local_steps_per_round"] * step_flops_of("r64")
            / (th["round_compute_budget_s"] * th["training_efficiency"] * 1e9))


def test_a_device_at_the_boundary_does_not_flip_between_tiers():
    g0 = boundary_gflops()
    speeds = [g0 * (1.03 if i % 2 else 0.97) for i in range(8)]
    without = [decide_tier(make_profile("linux-x86", 30.0, gflops=g)).tier for g in speeds]
    assert without == ["r32", "r64"] * 4  # the policy alone flips at the boundary
    previous, tiers = {"rank": 64}, []
    for g in speeds:
        decision = decide_tier(make_profile("linux-x86", 30.0, gflops=g), previous)
        tiers.append(decision.tier)
        previous = decision.to_json()
    assert tiers == ["r32"] * 8  # down at once, then never back up without 20% headroom
    assert has_reason(decision, "r64 fits but not with 20% headroom; staying at r32")


def test_moving_up_needs_headroom_and_moving_down_is_immediate():
    g0 = boundary_gflops()
    up = decide_tier(make_profile("linux-x86", 30.0, gflops=g0 * 1.25), TierDecision(32, "r32", 16, 128))
    assert up.tier == "r64" and has_reason(up, "moving up from r32 to r64")
    down = decide_tier(make_profile("linux-x86", 30.0, gflops=g0 * 0.5), {"rank": 64, "tier": "r64"})
    assert down.tier in ("r16", "r8", "r4") and has_reason(down, "moving down from r64")
    stay = decide_tier(make_profile("linux-x86", 30.0, gflops=g0 * 1.25), up)
    assert stay.tier == "r64" and has_reason(stay, "staying at r64")


def test_decision_is_pure_and_serialisable():
    profile = make_profile("jetson", 2.4, gflops=8.0, battery=on_battery(20.0))
    before = copy.deepcopy(profile)
    a, b = decide_tier(profile, {"rank": 8}), decide_tier(profile, {"rank": 8})
    assert profile == before and a == b
    doc = json.loads(json.dumps(a.to_json()))
    assert TierDecision.from_json(doc) == a and set(doc) == {"rank", "tier", "batch_size", "seq_len", "reasons",
                                                              "activation_checkpointing"}


def test_catalog_devices_get_their_tiers():
    """The catalog at nominal state (cool, on the charger) under the default policy with MiniLM."""
    expected = {"raspberry-pi-4": "r16", "raspberry-pi-5": "r64", "jetson-nano": "r16", "jetson-orin-nano": "r64",
                "jetson-agx-orin": "r64", "samsung-galaxy-a54": "r16", "google-pixel-8-pro": "r64",
                "thinkpad-t14-gen3-amd": "r64"}
    got = {cid: decide_tier(profile_for(cid)) for cid in list_devices()}
    assert {cid: d.tier for cid, d in got.items()} == expected
    assert all(has_reason(d, "catalog estimate sustained GFLOPS") for d in got.values())


@pytest.mark.parametrize("mutate,message", [
    (lambda p: p.update(schema="x"), "hetlora-tiers"),
    (lambda p: p.update(version=2), "unsupported version 2"),
    (lambda p: p["tiers"].pop(0), "tiers\\[0\\] must be the no-train tier"),
    (lambda p: p["tiers"][3].update(rank=4), "increasing rank"),
    (lambda p: p["tiers"][5].update(batch_size=1), "non-decreasing batch_size"),
    (lambda p: p["tiers"][2].update(seq_len="64"), "'seq_len' must be a non-negative integer"),
    (lambda p: p["tiers"][2].update(name="r4"), "names must be unique"),
    (lambda p: p["thresholds"].pop("hot_c"), "thresholds.hot_c"),
    (lambda p: p["thresholds"].update(round_compute_budget_s=0), "round_compute_budget_s must be positive"),
    (lambda p: p["thresholds"]["memory_safety_factor"].update(android=1.5), "memory_safety_factor.android"),
    (lambda p: p["thresholds"]["memory_safety_factor"].pop("jetson"), "a factor for each platform"),
    (lambda p: p["training"].update(optimizer="lion"), "training.optimizer"),
])
def test_policy_validation_names_the_problem(mutate, message):
    doc = copy.deepcopy(POLICY)
    mutate(doc)
    with pytest.raises(UserError, match=message):
        validate_policy(doc, "my-tiers.json")


def test_a_user_policy_file_changes_the_decision(tmp_path):
    doc = copy.deepcopy(POLICY)
    doc["thresholds"]["round_compute_budget_s"] = 30
    path = tmp_path / "tiers.json"
    path.write_text(json.dumps(doc))
    profile = make_profile("linux-x86", 30.0, gflops=40.0)
    assert decide_tier(profile).rank > decide_tier(profile, policy=load_policy(path)).rank
    path.write_text("{broken")
    with pytest.raises(UserError, match="not valid JSON"):
        load_policy(path)
    with pytest.raises(UserError, match="cannot read the tier policy"):
        load_policy(tmp_path / "missing.json")


@pytest.mark.parametrize("doc,message", [
    ({"schema": "other"}, "not a device profile"),
    ({"schema": "hetlora-profile", "version": 9}, "version 9"),
    (make_profile() | {"memory": {"usable_bytes": "8 GB"}}, "memory.usable_bytes"),
    (make_profile() | {"battery": "full"}, "battery must be an object"),
])
def test_bad_profiles_are_user_errors(doc, message):
    with pytest.raises(UserError, match=message):
        decide_tier(doc)


# --- memory and cost models ---------------------------------------------------------------------------

def test_memory_components_sum_to_the_total():
    est = predict_peak_memory(MINILM, 16, 16, 128, dense_params=1000)
    parts = est.to_json()
    assert parts.pop("total") == sum(parts.values()) == est.total
    assert est.optimizer_state == 2 * est.gradients == 2 * est.lora_params  # AdamW: exp_avg + exp_avg_sq
    assert predict_peak_memory(MINILM, 16, 16, 128, optimizer="sgd").optimizer_state == 0


def test_memory_grows_with_rank_batch_and_sequence():
    def total(**kw):
        args = {"rank": 8, "batch": 8, "seq_len": 64} | kw
        return predict_peak_memory(MINILM, args["rank"], args["batch"], args["seq_len"]).total

    for key, values in (("rank", [4, 8, 16, 32, 64]), ("batch", [1, 4, 8, 16, 32]), ("seq_len", [16, 32, 64, 128])):
        totals = [total(**{key: v}) for v in values]
        assert totals == sorted(totals) and len(set(totals)) == len(totals), key


def test_memory_model_rejects_bad_arguments():
    with pytest.raises(UserError, match="batch must be a positive integer"):
        predict_peak_memory(MINILM, 8, 0, 64)
    with pytest.raises(UserError, match="unknown optimizer"):
        predict_peak_memory(MINILM, 8, 8, 64, optimizer="lion")
    with pytest.raises(UserError, match="model types"):
        ModelShape.from_config({"model_type": "t5"})


def _tiny_model(arch: str):
    """(task, model class, config) of a 2-layer random-weight BERT or Llama (GQA, untied head)."""
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    if arch == "bert":
        return "classification", BertForSequenceClassification, BertConfig(
            vocab_size=500, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_labels=3, max_position_embeddings=64)
    return "causal-lm", LlamaForCausalLM, LlamaConfig(
        vocab_size=500, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_shape_activations_and_flops_match_real_models(arch, checkpointing):
    """Parameter count vs the model's own, saved bytes vs autograd's saved-tensor hooks, FLOPs vs FlopCounterMode.
    With activation checkpointing the hooks see what the forward pass keeps (not the layers' inputs that
    checkpointing stores itself, nor the recomputed layer's tensors): at most the formula, a fraction of the
    bytes kept without it."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from edge_client.checkpointing import set_activation_checkpointing
    from edge_client.lora import inject_lora
    from hetlora.models.folders import DEFAULT_TARGETS

    task, cls, config = _tiny_model(arch)
    torch.manual_seed(0)
    model = cls(config)
    shape = ModelShape.from_config(config.to_dict())
    base = getattr(model, model.base_model_prefix)
    head = 0 if task == "classification" else config.vocab_size * config.hidden_size
    assert shape.frozen_params == sum(p.numel() for p in base.parameters()) + head
    batch, seq, rank = 4, 32, 8
    targets = DEFAULT_TARGETS[config.model_type]
    inject_lora(model, targets, rank, alpha=16)
    model.train()
    set_activation_checkpointing(model, checkpointing)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    labels = ids if task == "causal-lm" else torch.zeros(batch, dtype=torch.long)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with FlopCounterMode(display=False) as counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
    predicted = saved_activation_bytes(shape, batch, seq, rank, len(targets), task=task, target_fraction=1.0,  # all targets
                                       checkpointed=checkpointing)
    if checkpointing:
        plain = saved_activation_bytes(shape, batch, seq, rank, len(targets), task=task, target_fraction=1.0)
        assert sum(saved.values()) <= predicted < 0.7 * plain
    else:
        assert predicted == pytest.approx(sum(saved.values()), rel=0.03)
    flops = cost.step_flops(shape, batch, seq, shape.default_lora_params(rank), checkpointing)
    # An upper bound: the first layer's frozen projections need no input gradient (embeddings are frozen).
    assert 1.0 <= flops / counter.get_total_flops() <= 1.15


def test_minilm_shape_matches_the_real_model(default_model_dir):
    import torch
    from transformers import AutoConfig, BertModel

    config = AutoConfig.from_pretrained(default_model_dir, local_files_only=True)
    with torch.device("meta"):
        model = BertModel(config)
    assert ModelShape.from_model_dir(default_model_dir) == MINILM
    assert MINILM.frozen_params == sum(p.numel() for p in model.parameters())


def test_the_servers_tier_line_is_short_and_its_reasons_wait_for_verbose(caplog):
    import logging

    from hetlora.engine.tiers import tier_for

    with caplog.at_level(logging.DEBUG, logger="hetlora.server"):
        tier = tier_for(make_profile(battery=on_battery(10)), 8, (4, 8, 16, 32, 64))
    (info,) = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    (debug,) = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert info.startswith("tier policy: r") and "allows rank" in info and len(info) <= 200
    assert "memory" in debug and len(debug) > len(info)
    assert tier.rank <= 8
