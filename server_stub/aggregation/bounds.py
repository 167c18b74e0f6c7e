"""Bounded influence of any one client, for every rule (pure numpy, no I/O).

Two guards (docs/PROTOCOL.md section 3.1, "Limits"):

1. At upload, `hetlora.protocol.wire.check_values`: every uploaded number must satisfy |x| <= MAX_ABS_VALUE,
   else 400 `value_too_large`.
2. Before the rule aggregates, `bound_influence` clips each client's *update*, its change from what it started
   from (`starts[k]`: its view of the previous global, components in upload order), per quantity q:
     `<module>.lora_A`   ||A_k - A0_k||_F / sqrt(r_k)     (rank-free component RMS; A_k := A0_k + t (A_k - A0_k))
     `<module>.lora_B`   ||B_k - B0_k||_F / sqrt(r_k)     (B_k := B0_k + t (B_k - B0_k))
     `<dense>`           ||D_k - D_prev||_F                (D_k := D_prev + t (D_k - D_prev))
     `n_samples`         n_k                               (n_k := max(1, floor(t n_k)))
   to `factor` x ref_q, where ref_q is anchored so that no client can walk it round by round:
     m_q   = median_low_k q_k (this round; one client of two cannot raise it)
     a_q   = the anchor: m_q of the first round in which q was measured (per stage), kept for the whole run
     ref_q = min(max(m_q, a_q / FLOOR_RATIO), a_q * CEILING_RATIO)     (ref_q = m_q in that first round)
   The floor keeps a tiny update from becoming the reference and zeroing everyone else; the ceiling keeps a
   majority (sybils) from raising it by more than CEILING_RATIO over the whole run. With `absolute_factor`
   (`--robust norm-bound`) the bound is also at most absolute_factor x a_q, whatever the round's median.
   An update is measured from its start, not the global's origin, so honest updates keep their size however
   far an attacker has pushed the global, and the bound cannot grow with it. A reference of 0 clips nothing.
   When nobody exceeds a bound the results come back unchanged (the same objects).
"""

from __future__ import annotations

import statistics

import numpy as np

from hetlora.protocol.wire import MAX_ABS_VALUE, Adapter, check_values
from server_stub.aggregation.contract import ClientResult

CLIP_FACTOR = 10.0
FLOOR_RATIO = 2.0
CEILING_RATIO = 4.0
__all__ = ["CLIP_FACTOR", "MAX_ABS_VALUE", "bound_influence", "check_values", "measure", "reference"]


def measure(starts: list[Adapter], results: list[ClientResult]) -> dict[str, list[float]]:
    """quantity -> its value per client (module docstring), every LoRA module and dense tensor of the starts."""
    values: dict[str, list[float]] = {}
    for name in starts[0].lora if starts else ():
        for suffix, side in ((".lora_A", 0), (".lora_B", 1)):
            values[name + suffix] = [_rms_delta(res.adapter.lora[name][side], start.lora[name][side], side)
                                     for res, start in zip(results, starts)]
    for name in starts[0].dense if starts else ():
        values[name] = [float(np.linalg.norm(np.asarray(res.adapter.dense[name], np.float64) - start.dense[name]))
                        for res, start in zip(results, starts)]
    values["n_samples"] = [float(res.n_samples) for res in results]
    return values


def reference(values: list[float], anchor: float | None) -> tuple[float, float | None]:
    """(ref_q, a_q) of one quantity: the anchored reference of the module docstring and the (new) anchor."""
    median = float(statistics.median_low(values))
    if anchor is None:
        return median, (median if median > 0 else None)
    return min(max(median, anchor / FLOOR_RATIO), anchor * CEILING_RATIO), anchor


def bound_influence(starts: list[Adapter], results: list[ClientResult], anchors: dict | None = None, *,
                    factor: float = CLIP_FACTOR, absolute_factor: float | None = None
                    ) -> tuple[list[ClientResult], dict[int, list[str]], dict[str, float]]:
    """(the clipped results, per clipped client index k what was clipped, the anchors after this round)."""
    anchors = dict(anchors or {})
    scales: dict[int, dict[str, float]] = {}
    for q, vals in measure(starts, results).items():
        ref, anchors_q = reference(vals, anchors.get(q))
        if anchors_q is not None:
            anchors[q] = anchors_q
        bound = factor * ref
        if absolute_factor is not None and anchors_q is not None:
            bound = min(bound, absolute_factor * anchors_q)
        for k, v in enumerate(vals):
            if bound > 0 and v > bound:
                scales.setdefault(k, {})[q] = bound / v
    bounded = [_clipped(res, start, scales[k]) if k in scales else res
               for k, (res, start) in enumerate(zip(results, starts))]
    return bounded, {k: sorted(s) for k, s in scales.items()}, anchors


def _clipped(res: ClientResult, start: Adapter, scale: dict[str, float]) -> ClientResult:
    """One client's result with each clipped quantity's change from its start scaled by t."""
    lora = {}
    for name, (a, b) in res.adapter.lora.items():
        a0, b0 = start.lora[name]
        lora[name] = (_toward(a, a0[: a.shape[0]], scale.get(name + ".lora_A")),
                      _toward(b, b0[:, : b.shape[1]], scale.get(name + ".lora_B")))
    dense = {name: _toward(t, start.dense[name], scale.get(name)) for name, t in res.adapter.dense.items()}
    n_samples = max(1, int(res.n_samples * scale["n_samples"])) if "n_samples" in scale else res.n_samples
    return ClientResult(adapter=Adapter(lora=lora, dense=dense, meta=res.adapter.meta), n_samples=n_samples,
                        indices=res.indices)


def _toward(value: np.ndarray, start: np.ndarray, t: float | None) -> np.ndarray:
    """start + t (value - start) in float32 (value itself when t is None)."""
    if t is None:
        return value
    start = np.asarray(start, np.float64)
    return (start + t * (np.asarray(value, np.float64) - start)).astype(np.float32)


def _rms_delta(value: np.ndarray, start: np.ndarray, side: int) -> float:
    """||value - start[:r]||_F / sqrt(r), r = value's rank (rows of A, columns of B)."""
    rank = value.shape[0] if side == 0 else value.shape[1]
    start = np.asarray(start, np.float64)
    start = start[:rank] if side == 0 else start[:, :rank]
    return float(np.linalg.norm(np.asarray(value, np.float64) - start)) / np.sqrt(max(rank, 1))
