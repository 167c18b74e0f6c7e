"""Tiers for the 135M language model: its packaged policy, small devices, and the server's use of the model's shape."""

from __future__ import annotations

import pytest

from hetlora.errors import UserError
from profiles.catalog import profile_for
from profiles.memory_model import ModelShape, predict_peak_memory
from profiles.policy import decide_tier, packaged_policy, tiers_of
from hetlora.engine.tiers import tier_for


@pytest.fixture(scope="module")
def lm(smollm2_dir):
    from hetlora.models.adapter_spec import derive_spec

    return derive_spec(smollm2_dir, "causal-lm"), ModelShape.from_model_dir(smollm2_dir)


def with_memory(catalog_id: str, usable_gb: float) -> dict:
    doc = profile_for(catalog_id)
    doc["memory"].update(usable_bytes=int(usable_gb * 1e9), available_bytes=int(usable_gb * 1e9))
    return doc


def test_a_causal_lm_run_uses_its_own_packaged_tiers(lm):
    spec, shape = lm
    lowest = tiers_of(packaged_policy("causal-lm"))[1]
    decision = decide_tier(profile_for("raspberry-pi-4"), spec=spec, model=shape, steps=10)
    assert (decision.rank, decision.batch_size, decision.seq_len) == (lowest.rank, lowest.batch_size, lowest.seq_len)
    assert shape.frozen_params == 134_515_008  # SmolLM2-135M-Instruct, tied embeddings counted once


def test_a_2gb_board_trains_a_small_batch_and_a_smaller_one_is_excluded_with_the_reason(lm):
    """A 1.5 GB board fits the lowest tier neither as is nor with activation checkpointing: the reason gives the
    leaner figure."""
    spec, shape = lm
    lowest = tiers_of(packaged_policy("causal-lm"))[1]
    args = dict(task="causal-lm", lora_params=spec.lora_parameter_count(lowest.rank), lora_modules=len(spec.modules))
    need = predict_peak_memory(shape, lowest.rank, lowest.batch_size, lowest.seq_len, **args).total
    lean = predict_peak_memory(shape, lowest.rank, lowest.batch_size, lowest.seq_len, activation_checkpointing=True,
                               **args).total
    factor = packaged_policy("causal-lm")["thresholds"]["memory_safety_factor"]["raspberry-pi"]
    two_gb = decide_tier(with_memory("raspberry-pi-4", 2.0), spec=spec, model=shape, steps=10)
    assert 2.0e9 * factor >= need and two_gb.rank == lowest.rank and two_gb.batch_size == lowest.batch_size
    small = decide_tier(with_memory("raspberry-pi-4", 1.5), spec=spec, model=shape, steps=10)
    assert 1.5e9 * factor < lean < need
    assert small.rank == 0 and "the smallest tier does not fit in memory" in small.reasons[-1]
    assert f"{lean / 1e9:.2f} GB predicted" in small.reasons[0] and "with activation checkpointing" in small.reasons[0]


def test_the_run_s_local_steps_set_the_compute_budget(lm):
    spec, shape = lm
    few = decide_tier(profile_for("raspberry-pi-4"), spec=spec, model=shape, steps=10)
    many = decide_tier(profile_for("raspberry-pi-4"), spec=spec, model=shape, steps=40)
    assert few.rank > 0 and many.rank == 0 and "40 steps" in many.reasons[1]


def test_the_server_sizes_a_client_by_the_run_s_model_not_the_policy_s_default(lm):
    spec, shape = lm
    tier = tier_for(profile_for("thinkpad-t14-gen3-amd"), 32, (4, 8, 16, 32), spec=spec, model=shape, steps=10)
    top = tiers_of(packaged_policy("causal-lm"))[-1]
    assert (tier.rank, tier.batch_size, tier.seq_len) == (top.rank, top.batch_size, top.seq_len)
    # The same laptop under the classification policy and MiniLM gets MiniLM's tiers.
    minilm = tier_for(profile_for("thinkpad-t14-gen3-amd"), 64, (4, 8, 16, 32, 64))
    assert (minilm.batch_size, minilm.seq_len) != (top.batch_size, top.seq_len)


def test_an_artifact_backend_is_sized_with_the_output_head_at_every_position(lm):
    """ONNX/ExecuTorch artifacts have fixed shapes and run the vocab head on every position; torch on targets."""
    spec, shape = lm
    args = dict(task="causal-lm", lora_params=spec.lora_parameter_count(8), lora_modules=len(spec.modules))
    torch_peak = predict_peak_memory(shape, 8, 8, 64, **args).total
    onnx_peak = predict_peak_memory(shape, 8, 8, 64, backend="onnx", **args).total
    assert onnx_peak == predict_peak_memory(shape, 8, 8, 64, target_fraction=1.0, **args).total > torch_peak
    classification = dict(lora_params=spec.lora_parameter_count(8), lora_modules=len(spec.modules))
    assert (predict_peak_memory(shape, 8, 8, 64, backend="onnx", **classification).total
            == predict_peak_memory(shape, 8, 8, 64, **classification).total)  # no vocab head, nothing changes


@pytest.mark.parametrize("batch, measured_mib", [(8, 2142), (4, 1687)])
def test_executorch_on_a_llama_is_sized_by_its_measured_peak(lm, batch, measured_mib):
    """SmolLM2-135M rank 8 from its XNNPACK artifact peaked at 2142 MiB at 8 x 64 and 1687 MiB at 4 x 64
    (`hetlora bench`): predicted within 5%, a little above ONNX Runtime's (the program's own state)."""
    spec, shape = lm
    args = dict(task="causal-lm", lora_params=spec.lora_parameter_count(8), lora_modules=len(spec.modules))
    predicted = predict_peak_memory(shape, 8, batch, 64, backend="executorch", **args).total / 2**20
    assert predicted == pytest.approx(measured_mib, rel=0.05)
    assert predict_peak_memory(shape, 8, batch, 64, backend="onnx", **args).total / 2**20 < predicted


def test_the_policy_reads_the_profile_s_training_backend(lm):
    from edge_client.device.profile import with_training_backend

    spec, shape = lm
    doc = with_memory("raspberry-pi-4", 2.0)
    torch_reason = decide_tier(doc, spec=spec, model=shape, steps=10).reasons[0]
    onnx_reason = decide_tier(with_training_backend(doc, "onnx"), spec=spec, model=shape, steps=10).reasons[0]
    assert " on torch" in torch_reason
    assert " on onnx" in onnx_reason and onnx_reason != torch_reason.replace(" on torch", " on onnx")
    with pytest.raises(UserError, match="unknown training backend 'tpu'"):
        decide_tier(with_training_backend(doc, "tpu"), spec=spec, model=shape, steps=10)


def test_the_packaged_causal_lm_policy_sizes_its_own_model_as_a_causal_lm_without_a_spec():
    """`hetlora profile --task causal-lm --tier` has no spec: the policy's model section says the task."""
    policy = packaged_policy("causal-lm")
    shape = ModelShape.from_config(policy["model"]["config"])
    reason = decide_tier(with_memory("raspberry-pi-4", 3.0), policy=policy).reasons[0]

    def stated(task: str) -> list[str]:
        def peak(t, checkpointed: bool) -> float:
            return predict_peak_memory(shape, t.rank, t.batch_size, t.seq_len, task=task,
                                       activation_checkpointing=checkpointed).total / 1e9

        return [f"{peak(t, ck):.2f} GB predicted for rank {t.rank} batch {t.batch_size} seq {t.seq_len}"
                for t in tiers_of(policy)[1:] for ck in (False, True)]

    assert any(text in reason for text in stated("causal-lm"))
    assert not any(text in reason for text in stated("classification"))  # the vocab head's logits are counted


def test_a_tier_that_fits_only_with_activation_checkpointing_trains_with_it(lm):
    """A fast device whose memory holds r8 with activation checkpointing but not without: r8, checkpointed, and the
    reason says so; the server's tier and the round's plan carry it. Under "never", or on an artifact backend
    (a fixed exported graph), the device stays at r4."""
    from edge_client.device.profile import with_training_backend
    from hetlora.engine.aggregation import make_rule
    from hetlora.protocol.settings import TrainingSettings

    spec, shape = lm
    policy = packaged_policy("causal-lm")
    r4, r8 = tiers_of(policy)[1:3]
    args = dict(task="causal-lm", lora_params=spec.lora_parameter_count(8), lora_modules=len(spec.modules))
    plain = predict_peak_memory(shape, r8.rank, r8.batch_size, r8.seq_len, **args).total
    lean = predict_peak_memory(shape, r8.rank, r8.batch_size, r8.seq_len, activation_checkpointing=True, **args).total
    factor = policy["thresholds"]["memory_safety_factor"]["linux-x86"]
    usable_gb = (lean + plain) / 2 / factor / 1e9
    doc = with_memory("thinkpad-t14-gen3-amd", usable_gb)

    decision = decide_tier(doc, spec=spec, model=shape, steps=10)
    assert (decision.rank, decision.activation_checkpointing) == (r8.rank, True)
    assert any(r.startswith(f"activation checkpointing: {r8.name} trains with it") for r in decision.reasons)
    assert "with activation checkpointing" in decision.reasons[0]

    tier = tier_for(doc, 32, (4, 8, 16, 32), spec=spec, model=shape, steps=10)
    assert (tier.rank, tier.activation_checkpointing) == (8, True)
    plan = make_rule("hetlora").configure(round_number=1, client_key="c", tier=tier, global_rank=32, seed=0,
                                          training=TrainingSettings())
    assert plan.training.activation_checkpointing

    never = dict(policy, training=dict(policy["training"], activation_checkpointing="never"))
    assert decide_tier(doc, spec=spec, model=shape, steps=10, policy=never).rank == r4.rank
    onnx = decide_tier(with_training_backend(doc, "onnx"), spec=spec, model=shape, steps=10)
    assert not onnx.activation_checkpointing and onnx.rank <= r4.rank


def test_a_tier_that_fits_without_checkpointing_does_not_pay_its_step_time(lm):
    spec, shape = lm
    decision = decide_tier(with_memory("thinkpad-t14-gen3-amd", 16.0), spec=spec, model=shape, steps=10)
    assert decision.rank == tiers_of(packaged_policy("causal-lm"))[-1].rank and not decision.activation_checkpointing
    assert not any("checkpointing" in r for r in decision.reasons)


@pytest.mark.parametrize("batch, seq_len, measured_mb", [(4, 64, 1309), (8, 64, 1646), (8, 128, 1920),
                                                         (16, 128, 2916)])
def test_checkpointed_training_is_sized_by_its_measured_peak(lm, batch, seq_len, measured_mb):
    """SmolLM2-135M rank 8 with activation checkpointing (benchmarks/bench_memory.py; targets on a third of a row)."""
    spec, shape = lm
    predicted = predict_peak_memory(shape, 8, batch, seq_len, task="causal-lm", target_fraction=1 / 3,
                                    lora_params=spec.lora_parameter_count(8), lora_modules=len(spec.modules),
                                    activation_checkpointing=True).total / 1e6
    assert predicted == pytest.approx(measured_mb, rel=0.10)
    with pytest.raises(UserError, match="torch-backend option"):
        predict_peak_memory(shape, 8, batch, seq_len, backend="executorch", activation_checkpointing=True)


def test_the_policy_names_the_checkpointing_modes():
    from profiles.policy import validate_policy

    bad = dict(packaged_policy("causal-lm"), training={"activation_checkpointing": "sometimes"})
    with pytest.raises(UserError, match="activation_checkpointing must be one of never, as-needed, always"):
        validate_policy(bad)
