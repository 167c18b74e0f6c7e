"""`hetlora bench`: the step-shaped matmul peak, fractions that cannot pass 100% unflagged, the --watts estimate."""

from __future__ import annotations

import pytest
import torch
from fakeroots import make_root

from edge_client.bench.peak import fraction, gemm_mix, linear_maps, mixed_rate, step_peak
from edge_client.bench.runner import CellRun, Segment, summarize_cell
from edge_client.device.energy import EnergyMeter, EnergyResult, meter_for
from edge_client.device.host import Host
from profiles.cost import step_flops
from profiles.memory_model import ModelShape
from tests.helpers.energy import drive

# h 4, ffn 8, 2 layers; T = 2 x 3 = 6 tokens. P_mm = 2 * (4*4*4 + 2*4*8) = 256
BERT = ModelShape("bert", hidden=4, layers=2, heads=2, kv_heads=2, intermediate=8, vocab=50, max_positions=16,
                  frozen_params=0, matmul_params=256)
# Llama h 8, 4 heads, 2 kv heads (kv width 4), ffn 16, 1 layer, vocab 20:
# P_mm = 2*64 + 2*8*4 + 3*8*16 + 20*8 = 128 + 64 + 384 + 160 = 736
LLAMA = ModelShape("llama", hidden=8, layers=1, heads=4, kv_heads=2, intermediate=16, vocab=20, max_positions=16,
                   frozen_params=0, matmul_params=736)


def test_bert_gemms_by_hand():
    assert linear_maps(BERT) == {(4, 4): 8, (4, 8): 2, (8, 4): 2}
    mix = gemm_mix(BERT, batch=2, seq_len=3)
    # (4,4): 2 * 6 * 16 FLOPs x 8 maps = 1536; (4,8) and (8,4): 2 * 6 * 32 x 2 = 768; forward and backward each
    assert mix == {("forward", 6, 4, 4): 1536, ("backward", 6, 4, 4): 1536, ("forward", 6, 4, 8): 768,
                   ("backward", 6, 4, 8): 768, ("forward", 6, 8, 4): 768, ("backward", 6, 8, 4): 768}


@pytest.mark.parametrize("shape", [BERT, LLAMA], ids=["bert", "llama"])
def test_the_gemm_mix_is_the_frozen_matmul_term_of_the_step_flops(shape):
    """4 * P_mm * T of profiles.cost.step_flops (no LoRA, attention subtracted) is exactly the mix's FLOPs."""
    batch, seq_len = 2, 3
    attention = 12 * shape.layers * batch * seq_len ** 2 * shape.hidden
    assert sum(gemm_mix(shape, batch, seq_len).values()) == step_flops(shape, batch, seq_len, 0) - attention


def test_the_peak_is_the_flops_weighted_harmonic_rate():
    # 100 FLOPs at 10/s and 300 at 30/s take 10 + 10 seconds: 400 / 20 = 20
    assert mixed_rate({"a": 100, "b": 300}, {"a": 10, "b": 30}) == pytest.approx(20)
    assert mixed_rate({"a": 5}, {"a": 7}) == pytest.approx(7)


@pytest.mark.parametrize("achieved, peak, expected", [
    (50.0, 100.0, {"peak_fraction": 0.5, "peak_fraction_raw": 0.5, "peak_underestimated": False}),
    (100.0, 100.0, {"peak_fraction": 1.0, "peak_fraction_raw": 1.0, "peak_underestimated": False}),
    (175.0, 97.0, {"peak_fraction": 1.0, "peak_fraction_raw": 175 / 97, "peak_underestimated": True}),
    (50.0, None, {"peak_fraction": None, "peak_fraction_raw": None, "peak_underestimated": None}),
])
def test_fractions_clamp_at_one_and_flag_an_underestimated_peak(achieved, peak, expected):
    assert fraction(achieved, peak) == pytest.approx(expected)


def run_with_seconds(seconds: list[float]) -> CellRun:
    energy = EnergyResult("unavailable", None, None, sum(seconds), None, 0, None)
    cond = {"temp_c": None}
    return CellRun("torch", 4, 4, [Segment(seconds, energy, 2 ** 20 * 100, cond, cond)])


def test_a_cell_reports_real_tokens_and_a_clamped_fraction():
    """Mean step 0.5 s, 1e9 FLOPs: 2 GFLOPS against a 1.6 GFLOPS peak is flagged; 48 of 64 positions are real."""
    cell = summarize_cell(run_with_seconds([0.4, 0.6]), batch=4, seq_len=16, flops_per_step=1e9, peak_gflops=1.6,
                          upload_bytes=0, real_tokens=48)
    assert cell["achieved_gflops"] == pytest.approx(2.0)
    assert (cell["peak_fraction"], cell["peak_underestimated"]) == (1.0, True)
    assert cell["peak_fraction_raw"] == pytest.approx(1.25)
    assert cell["tokens_per_s"] == pytest.approx(128) and cell["real_tokens_per_s"] == pytest.approx(96)


def test_step_peak_measures_every_gemm_of_the_mix_at_the_current_threads():
    peak = step_peak(BERT, batch=2, seq_len=3, seconds_per_shape=0.01)
    assert peak["threads"] == torch.get_num_threads()
    assert {(g["kind"], g["tokens"], g["in"], g["out"]) for g in peak["gemms"]} == set(gemm_mix(BERT, 2, 3))
    rates = {(g["kind"], g["tokens"], g["in"], g["out"]): g["gflops"] for g in peak["gemms"]}
    assert peak["value"] == pytest.approx(mixed_rate(gemm_mix(BERT, 2, 3), rates))
    assert sum(g["flops_share"] for g in peak["gemms"]) == pytest.approx(1.0)


def test_watts_turn_an_unmeasurable_device_into_a_labelled_estimate(tmp_path):
    """No power source, no catalog match: --watts 20 gives P = 20 W x CPU utilisation."""
    root, env = make_root("container", tmp_path)
    stat = root / "proc/stat"
    stat.write_text("cpu  0 0 0 0 0 0 0 0 0 0\n")
    assert meter_for(Host(root, env)).status == "unavailable"
    meter = meter_for(Host(root, env), user_watts=20.0)
    assert meter.status == "estimated" and "--watts" in meter.source.model

    def set_state(t):  # half busy: of every 400 jiffies, 200 user and 200 idle
        stat.write_text(f"cpu  {int(t * 200)} 0 0 {int(t * 200)} 0 0 0 0 0 0\n")

    result = drive(EnergyMeter(meter.source), set_state, [0.0, 1.0, 2.0], (0.0, 2.0))
    assert (result.energy_status, result.scope) == ("estimated", "estimate")
    # readings 0 W (no interval yet), 10 W, 10 W at t = 0, 1, 2: trapezoids (0 + 10) / 2 + 10 = 15 J
    assert result.joules == pytest.approx(15.0)
