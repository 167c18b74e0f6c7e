"""Bounded influence of any one client, for every rule (pure numpy, no I/O).

Two guards (docs/PROTOCOL.md section 3, "Limits"):

1. At upload, `check_values`: every uploaded number (factors with the scale folded in, dense
   tensors) must satisfy |x| <= MAX_ABS_VALUE, else 400 `value_too_large`.
2. Before `rule.aggregate`, `bound_influence` clips each client against the round's robust scale,
   c = CLIP_FACTOR and med = the lower median over the round's clients (`statistics.median_low`,
   so one client of two cannot raise it), per module:
     ||A_k||_F / sqrt(r_k)  <= c * med_j ||A_j||_F / sqrt(r_j)   (scale A_k; rank-free component RMS)
     ||B_k||_F / sqrt(r_k)  <= c * med_j ||B_j||_F / sqrt(r_j)   (scale B_k)
     ||B_k A_k||_F          <= c * med_j ||B_j A_j||_F           (then scale B_k; `linalg.update_norm`)
   per dense tensor, on the change D_k - D_prev of the previous global:
     ||D_k - D_prev||_F     <= c * med_j ||D_j - D_prev||_F      (D_k := D_prev + t (D_k - D_prev))
   and the aggregation weight n_k <= c * med_j n_j.
   Clipping multiplies a factor by t = bound / norm < 1, so B A is never formed. A median of 0 carries
   no scale: that quantity is left alone. The global factors of fedavg, hetlora and plora are convex
   combinations of the client factors and hlora's dW is a convex combination of B_k A_k, so the new global
   stays within c times the round's median scale whatever one client sends; hetlora's sparsity share
   p_k ~ ||B_k A_k||_F is computed from the clipped factors, so it is capped at the clipped score.
   When nobody exceeds a bound the results come back unchanged (the same objects).
"""

from __future__ import annotations

import statistics

import numpy as np

from hetlora.protocol.wire import Adapter, WireFormatError
from server_stub.aggregation.contract import ClientResult
from server_stub.aggregation.linalg import update_norm

MAX_ABS_VALUE = 1e4
CLIP_FACTOR = 10.0


def check_values(adapter: Adapter, limit: float = MAX_ABS_VALUE) -> None:
    """WireFormatError `value_too_large` when any factor or dense value has |x| > limit."""
    tensors = [(name + ".lora_A", a) for name, (a, _) in adapter.lora.items()]
    tensors += [(name + ".lora_B", b) for name, (_, b) in adapter.lora.items()]
    tensors += list(adapter.dense.items())
    for name, t in tensors:
        if t.size and float(np.max(np.abs(t))) > limit:
            raise WireFormatError("value_too_large", f"{name} has a value of magnitude {float(np.max(np.abs(t))):.3g}, "
                                  f"above the server's limit of {limit:g} (scale folded in); the update was not stored")


def _caps(values: list[float], factor: float) -> list[float]:
    """Per value: factor * median_low(values) / value when the value exceeds that bound, else 1."""
    bound = factor * statistics.median_low(values)
    return [bound / v if bound > 0 and v > bound else 1.0 for v in values]


def bound_influence(previous: Adapter, results: list[ClientResult], factor: float = CLIP_FACTOR
                    ) -> tuple[list[ClientResult], dict[int, list[str]]]:
    """The clipped results (module docstring) and, per clipped client index k, what was clipped."""
    clipped: dict[int, list[str]] = {}
    loras = [dict(res.adapter.lora) for res in results]
    denses = [dict(res.adapter.dense) for res in results]
    for name in previous.lora:
        factors = [(np.asarray(lora[name][0], np.float64), np.asarray(lora[name][1], np.float64)) for lora in loras]
        rms_a = [float(np.linalg.norm(a)) / np.sqrt(a.shape[0]) for a, _ in factors]
        rms_b = [float(np.linalg.norm(b)) / np.sqrt(b.shape[1]) for _, b in factors]
        for k, (t_a, t_b) in enumerate(zip(_caps(rms_a, factor), _caps(rms_b, factor))):
            factors[k] = (factors[k][0] * t_a, factors[k][1] * t_b)
            _note(clipped, k, t_a, f"{name}.lora_A")
            _note(clipped, k, t_b, f"{name}.lora_B")
        for k, t in enumerate(_caps([update_norm(a, b) for a, b in factors], factor)):
            factors[k] = (factors[k][0], factors[k][1] * t)
            _note(clipped, k, t, f"{name} update")
        for k, (a, b) in enumerate(factors):
            if k in clipped:
                loras[k][name] = (a.astype(np.float32), b.astype(np.float32))
    for name, prev in previous.dense.items():
        prev = np.asarray(prev, np.float64)
        deltas = [np.asarray(dense[name], np.float64) - prev for dense in denses]
        for k, t in enumerate(_caps([float(np.linalg.norm(d)) for d in deltas], factor)):
            if t < 1.0:
                denses[k][name] = (prev + t * deltas[k]).astype(np.float32)
                _note(clipped, k, t, name)
    n_caps = _caps([float(res.n_samples) for res in results], factor)
    bounded = []
    for k, (res, t_n) in enumerate(zip(results, n_caps)):
        _note(clipped, k, t_n, "n_samples")
        if k not in clipped:
            bounded.append(res)
            continue
        n_samples = max(1, int(res.n_samples * t_n)) if t_n < 1.0 else res.n_samples
        adapter = Adapter(lora=loras[k], dense=denses[k], meta=res.adapter.meta)
        bounded.append(ClientResult(adapter=adapter, n_samples=n_samples, indices=res.indices))
    return bounded, clipped


def _note(clipped: dict[int, list[str]], k: int, t: float, what: str) -> None:
    if t < 1.0:
        clipped.setdefault(k, []).append(what)
