"""Compute measurements: matmul GFLOPS and a real LoRA step on a tiny model, inside a full (non-quick) profile."""

from __future__ import annotations

import math

import pytest
from fakeroots import make_root

from edge_client.device import compute
from edge_client.device.profile import collect_profile, validate_profile


@pytest.mark.slow
def test_full_profile_measures_compute_and_clocks_under_load(tmp_path, tiny_bert_dir, monkeypatch):
    monkeypatch.setitem(compute.SHORT, "peak_s", 0.1)
    monkeypatch.setitem(compute.SHORT, "sustained_s", 0.2)
    root, env = make_root("raspberry-pi-4", tmp_path)
    doc = collect_profile(root, quick=False, step=True, model_dir=tiny_bert_dir, env=env)
    assert validate_profile(doc) == [] and doc["quick"] is False
    measured = doc["compute"]
    assert set(measured) == {"peak_gflops", "sustained_gflops", "duration_s", "lora_step_s"}
    assert all(math.isfinite(v) and v > 0 for v in measured.values())
    assert measured["duration_s"] >= 0.3  # both phases ran at least as long as asked
    # the fake Pi stays at 600 of 1800 MHz while the matmuls run: the cpufreq check fires too
    assert doc["cpu"]["throttle_reasons"][0].startswith("cpufreq below 90% of max under load")


def test_lora_step_needs_a_timed_step(tiny_bert_dir):
    with pytest.raises(ValueError, match="at least 2 steps"):
        compute.lora_step_seconds(tiny_bert_dir, steps=1)
