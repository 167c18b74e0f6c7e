"""Bounded influence of any one client, for every rule (pure numpy, no I/O).

Two guards (docs/PROTOCOL.md section 3.1, "Limits"):

1. At upload, `hetlora.protocol.wire.check_values`: every uploaded number must satisfy |x| <= MAX_ABS_VALUE,
   else 400 `value_too_large`.
2. Before the rule aggregates, `bound_influence` clips each client's *update*, its change from what it started
   from (`starts[k]`: its view of the previous global, components in upload order), per quantity q:
     `<module>.lora_A`   ||A_k - A0_k||_F / sqrt(r_k)     (rank-free component RMS; A_k := A0_k + t (A_k - A0_k))
     `<module>.lora_B`   ||B_k - B0_k||_F / sqrt(r_k)     (B_k := B0_k + t (B_k - B0_k))   both to FACTOR_CLIP x ref
     `<module>.update`   ||B_k A_k - B0_k A0_k||_F        (then, on the clipped factors: both changes scaled by
                                                           the s in (0, 1] with s ||X|| + s^2 ||Y|| = bound,
                                                           X = B0 dA + dB A0, Y = dB dA, so the change is <= bound)
     `<dense>`           ||D_k - D_prev||_F                (D_k := D_prev + t (D_k - D_prev))
     `n_samples`         n_k                               (n_k := max(1, floor(t n_k)))
   to `factor` (CLIP_FACTOR) x ref_q; every norm from the factors, B A never formed. ref_q is anchored so that no
   client can walk it round by round:
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
from hetlora.engine.aggregation.contract import ClientResult
from hetlora.engine.aggregation.linalg import update_norm

# Measured on the demo (BANKING77, 8 clients, seed 0): honest updates stay within 1.6x the round's median for
# products, heads and sample counts, and within 4x for the factors' component RMS (a rank-8 client's B among
# rank-32 ones), so the factors get the looser bound.
CLIP_FACTOR = 4.0
FACTOR_CLIP = 10.0
FLOOR_RATIO = 2.0
CEILING_RATIO = 4.0
__all__ = ["CLIP_FACTOR", "FACTOR_CLIP", "MAX_ABS_VALUE", "bound_influence", "check_values", "measure", "reference"]


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
        loose = FACTOR_CLIP / CLIP_FACTOR if q.endswith((".lora_A", ".lora_B")) else 1.0
        absolute = absolute_factor * loose if absolute_factor is not None else None
        for k, t in _caps(q, vals, anchors, factor * loose, absolute).items():
            scales.setdefault(k, {})[q] = t
    bounded = [_clipped(res, start, scales[k]) if k in scales else res
               for k, (res, start) in enumerate(zip(results, starts))]
    for name in starts[0].lora if starts else ():
        parts = [_product_parts(res.adapter.lora[name], start.lora[name]) for res, start in zip(bounded, starts)]
        values = [value for value, _, _ in parts]
        for k, t in _caps(name + ".update", values, anchors, factor, absolute_factor).items():
            _, x, y = parts[k]
            s_k = _root(x, y, t * values[k])
            scales.setdefault(k, {})[name + ".update"] = s_k
            bounded[k] = _clipped(bounded[k], starts[k], {name + ".lora_A": s_k, name + ".lora_B": s_k})
    return bounded, {k: sorted(s) for k, s in scales.items()}, anchors


def _caps(q: str, values: list[float], anchors: dict, factor: float, absolute: float | None) -> dict[int, float]:
    """Client index -> t = bound / value for the clients above quantity q's bound (q's anchor set in `anchors`)."""
    ref, anchor = reference(values, anchors.get(q))
    if anchor is not None:
        anchors[q] = anchor
    bound = factor * ref
    if absolute is not None and anchor is not None:
        bound = min(bound, absolute * anchor)
    return {k: bound / v for k, v in enumerate(values) if bound > 0 and v > bound}


def _product_parts(factors, start) -> tuple[float, float, float]:
    """(||B A - B0 A0||, ||X||, ||Y||) with X = B0 dA + dB A0 and Y = dB dA, from the factors (rank r of A)."""
    a, b = (np.asarray(t, np.float64) for t in factors)
    r = a.shape[0]
    a0, b0 = np.asarray(start[0][:r], np.float64), np.asarray(start[1][:, :r], np.float64)
    da, db = a - a0, b - b0
    return (update_norm(np.vstack([a, a0]), np.hstack([b, -b0])), update_norm(np.vstack([da, a0]), np.hstack([b0, db])),
            update_norm(da, db))


def _root(x: float, y: float, bound: float) -> float:
    """The s in (0, 1] with s x + s^2 y = bound (so ||s X + s^2 Y|| <= bound)."""
    s = bound / x if y <= 0 else (-x + np.sqrt(x * x + 4 * y * bound)) / (2 * y)
    return float(min(s, 1.0))


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
