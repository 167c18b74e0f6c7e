"""The matmul peak a training step is measured against: the step's own GEMM shapes at the step's threads.

A step's FLOPs are mostly the products of T = batch * seq_len token rows with the layers' frozen
linear maps, weights W stored (out x in) as torch stores them: forward F.linear(x, W) = x @ W^T with
x (T x in), and in the backward pass the activation gradient g @ W with g (T x out). Each distinct
GEMM is timed with that same call, in short bursts after a warm-up, at torch's current thread count
(the one the step runs with); its rate r_i is the best burst. The peak is the rate of the whole mix,
weighted by each GEMM's FLOPs f_i:

    peak = sum(f_i) / sum(f_i / r_i)

(the time the mix takes at the best rates, so the step, which does more than these GEMMs, cannot beat it
unless the measurement was disturbed). `fraction` clamps achieved / peak to 1 and flags the cell
when the raw value exceeds it: then the peak was underestimated (machine load while it was measured).
"""

from __future__ import annotations

import time
from collections import Counter

from profiles.memory_model import ModelShape

BURST_S = 0.05


def linear_maps(shape: ModelShape) -> Counter:
    """(in, out) -> how many of the model's frozen linear maps have that shape (the P_mm of profiles.cost:
    the layers' maps, plus a Llama's output head)."""
    h, inter = shape.hidden, shape.intermediate
    if shape.architecture == "bert":
        per_layer = [(h, h)] * 4 + [(h, inter), (inter, h)]
    else:
        kv = shape.kv_heads * (h // shape.heads)
        per_layer = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]
    maps = Counter({m: n * shape.layers for m, n in Counter(per_layer).items()})
    if shape.architecture != "bert":
        maps[(h, shape.vocab)] += 1
    return maps


def gemm_mix(shape: ModelShape, batch: int, seq_len: int) -> dict[tuple[str, int, int, int], float]:
    """(kind, T, in, out) of every distinct GEMM a step runs through the linear maps -> its FLOPs per step;
    kind "forward" is x @ W^T, kind "backward" the activation gradient g @ W."""
    tokens = batch * seq_len
    mix: Counter = Counter()
    for (d_in, d_out), count in linear_maps(shape).items():
        flops = 2.0 * tokens * d_in * d_out * count
        mix[("forward", tokens, d_in, d_out)] += flops
        mix[("backward", tokens, d_in, d_out)] += flops
    return dict(mix)


def mixed_rate(flops: dict, rates: dict) -> float:
    """FLOPs-weighted harmonic mean: sum(f_i) / sum(f_i / r_i), in the units of `rates`."""
    return sum(flops.values()) / sum(f / rates[key] for key, f in flops.items())


def fraction(achieved: float, peak: float | None) -> dict:
    """{"peak_fraction": min(1, achieved / peak), "peak_fraction_raw", "peak_underestimated"} (None without a peak)."""
    if not peak:
        return {"peak_fraction": None, "peak_fraction_raw": None, "peak_underestimated": None}
    raw = achieved / peak
    return {"peak_fraction": min(1.0, raw), "peak_fraction_raw": raw, "peak_underestimated": raw > 1.0}


def gemm_gflops(kind: str, tokens: int, d_in: int, d_out: int, seconds: float) -> float:
    """Best rate (GFLOPS) of one float32 GEMM of `gemm_mix` over bursts of about BURST_S, after a warm-up."""
    import torch

    weight = torch.randn(d_out, d_in)
    if kind == "forward":
        x = torch.randn(tokens, d_in)

        def call():
            return torch.nn.functional.linear(x, weight)
    else:
        g = torch.randn(tokens, d_out)

        def call():
            return torch.mm(g, weight)
    flops = 2.0 * tokens * d_in * d_out
    t = time.perf_counter()
    for _ in range(3):
        call()
    per_burst = max(1, int(BURST_S / max((time.perf_counter() - t) / 3, 1e-7)))
    best, deadline = 0.0, time.perf_counter() + seconds
    while True:
        t = time.perf_counter()
        for _ in range(per_burst):
            call()
        best = max(best, per_burst * flops / (time.perf_counter() - t))
        if time.perf_counter() >= deadline:
            return best / 1e9


def step_peak(shape: ModelShape, batch: int, seq_len: int, seconds_per_shape: float = 0.5) -> dict:
    """The peak of the step's GEMM mix at torch's current threads: {"value", "shapes", "threads", "source"}."""
    import torch

    mix = gemm_mix(shape, batch, seq_len)
    rates = {key: gemm_gflops(*key, seconds_per_shape) for key in mix}
    return {"value": mixed_rate(mix, rates), "threads": torch.get_num_threads(),
            "gemms": [{"kind": kind, "tokens": t, "in": d_in, "out": d_out, "gflops": rates[(kind, t, d_in, d_out)],
                       "flops_share": f / sum(mix.values())} for (kind, t, d_in, d_out), f in mix.items()],
            "source": f"measured: the step's {len(mix)} linear-map GEMMs (float32, best burst each, "
                      f"{torch.get_num_threads()} threads), FLOPs-weighted"}


def best_of(first: dict, second: dict) -> dict:
    """The higher of two peak measurements (before and after the cells), with both values kept."""
    best = first if first["value"] >= second["value"] else second
    return {**best, "measurements": [first["value"], second["value"]]}
