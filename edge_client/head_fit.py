"""A client's local fit of the linear head on frozen features, for the head rounds (federated linear probing).

Pure numpy (every backend can run it; the features come from the backend once). The loss is the
logit-adjusted cross-entropy for label skew (Menon et al., ICLR 2021; in federated form FedLC, Zhang et
al., ICML 2022, and the restricted softmax of FedRS, Li and Zhan, KDD 2021):

    loss = mean_i CE(W x_i + b + a, y_i),  a_c = log pi_local(c) - log pi_global(c)  (classes seen here)
                                           a_c = -inf                               (classes not seen here)

so a client whose data over-represents some classes does not push the shared head towards them, and it
never changes the rows of classes it has no example of (their softmax mass, hence their gradient, is 0).
pi_global is the run's pooled class distribution (Laplace-smoothed; uniform when the server sends none).
Optimiser: Adam (beta 0.9 / 0.999, eps 1e-8) over `epochs` shuffled passes of `batch_size` rows.
`fit_plan_head` is a whole head round's update and `round_statistics` round 0's, for the HTTP client and the
Flower node alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from hetlora.protocol.energy import Power
from hetlora.protocol.head_stats import HeadStatistics, class_statistics
from hetlora.protocol.plan import ClientPlan
from hetlora.protocol.settings import TrainingSettings
from hetlora.protocol.spec import AdapterSpec, linear_head
from hetlora.protocol.wire import Adapter

BETAS = (0.9, 0.999)
EPS = 1e-8


@dataclass(frozen=True)
class HeadFit:
    """The fitted head and the logit-adjusted loss on the client's rows before and after."""

    weight: np.ndarray
    bias: np.ndarray
    loss_before: float
    loss_after: float


def logit_adjustment(labels: np.ndarray, num_labels: int, class_counts=None) -> np.ndarray:
    """a (C,): log pi_local - log pi_global on the classes `labels` contain, -inf elsewhere."""
    local = np.bincount(labels, minlength=num_labels).astype(np.float64)
    if class_counts is None:
        pooled = np.ones(num_labels)
    else:
        pooled = np.asarray(class_counts, dtype=np.float64) + 1.0
        if pooled.shape != (num_labels,):
            raise ValueError(f"class_counts has {pooled.shape[0]} entries for {num_labels} labels")
    present = local > 0
    adjust = np.full(num_labels, -np.inf)
    adjust[present] = np.log(local[present] / local.sum()) - np.log(pooled[present] / pooled.sum())
    return adjust


def adjusted_loss(weight, bias, features, labels, adjust) -> float:
    """Mean logit-adjusted cross-entropy (the module docstring's loss)."""
    return float(_loss_and_grads(weight, bias, features, labels, adjust, grads=False)[0])


def fit_head(weight: np.ndarray, bias: np.ndarray, features: np.ndarray, labels: np.ndarray, adjust: np.ndarray, *,
             epochs: int, lr: float, batch_size: int, seed: int) -> HeadFit:
    """Adam on CE(W x + b + adjust, y) from (weight (C, d), bias (C,)); float64 inside, float32 out.
    `adjust` (C,): `logit_adjustment(labels, C, class_counts)` for a head round (zeros: plain cross-entropy)."""
    if epochs < 1 or lr <= 0 or batch_size < 1:
        raise ValueError("head fitting needs epochs >= 1, lr > 0 and batch_size >= 1")
    labels = np.asarray(labels, dtype=np.int64)
    w, b = np.asarray(weight, np.float64).copy(), np.asarray(bias, np.float64).copy()
    x = np.asarray(features, np.float64)
    before = adjusted_loss(w, b, x, labels, adjust)
    moments = [np.zeros_like(w), np.zeros_like(w), np.zeros_like(b), np.zeros_like(b)]
    rng = np.random.default_rng(seed)
    t = 0
    for _ in range(epochs):
        order = rng.permutation(len(labels))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            _, g_w, g_b = _loss_and_grads(w, b, x[rows], labels[rows], adjust, grads=True)
            t += 1
            w -= _adam_step(g_w, moments[0], moments[1], t, lr)
            b -= _adam_step(g_b, moments[2], moments[3], t, lr)
    return HeadFit(w.astype(np.float32), b.astype(np.float32), before, adjusted_loss(w, b, x, labels, adjust))


def fit_plan_head(spec: AdapterSpec, start: Adapter, features: np.ndarray, labels: np.ndarray, plan: ClientPlan,
                  settings: TrainingSettings, client_id: str, power: Power) -> tuple[Adapter, HeadFit]:
    """A head round's update: `start`'s head fitted on the frozen (features, labels), logit-adjusted with the
    plan's class_counts, for settings.head_epochs passes at settings.head_fit_lr in batches of
    settings.batch_size seeded by settings.seed; the head alone with the head-fit metadata (round, client_id,
    mode, n_samples, losses, the fit's seconds and energy estimate at `power`). ValueError when the plan's
    class_counts do not fit the run's labels."""
    weight_name, bias_name, num_labels, _ = linear_head(spec)
    adjust = logit_adjustment(labels, num_labels, plan.class_counts)
    t0 = time.perf_counter()
    fit = fit_head(start.dense[weight_name], start.dense[bias_name], features, labels, adjust,
                   epochs=settings.head_epochs, lr=settings.head_fit_lr, batch_size=settings.batch_size,
                   seed=settings.seed)
    meta = {"round": plan.round, "client_id": client_id, "mode": plan.mode, "n_samples": len(labels),
            "loss_before": fit.loss_before, "loss_after": fit.loss_after,
            "energy": power.report(time.perf_counter() - t0)}
    return Adapter(lora={}, dense={weight_name: fit.weight, bias_name: fit.bias}, meta=meta), fit


def round_statistics(spec: AdapterSpec, frozen_features: Callable[[], tuple], round_number: int, client_id: str,
                     power: Power) -> HeadStatistics:
    """Round 0's upload: the class statistics of (features, labels) = `frozen_features()`, with the metadata
    (round, client_id, n_samples, the seconds of the features and the statistics, their energy estimate at
    `power`)."""
    t0 = time.perf_counter()
    stats = class_statistics(*frozen_features(), linear_head(spec)[2])
    stats.meta = {"round": round_number, "client_id": client_id, "n_samples": stats.n_samples,
                  "energy": power.report(time.perf_counter() - t0)}
    return stats


def _loss_and_grads(w, b, x, y, adjust, *, grads: bool):
    logits = x @ w.T + b + adjust
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    loss = -log_p[np.arange(len(y)), y].mean()
    if not grads:
        return loss, None, None
    delta = np.exp(log_p)
    delta[np.arange(len(y)), y] -= 1.0
    delta /= len(y)
    return loss, delta.T @ x, delta.sum(axis=0)


def _adam_step(grad, m, v, t: int, lr: float) -> np.ndarray:
    """Adam's update for one tensor; `m` and `v` are updated in place."""
    m *= BETAS[0]
    m += (1 - BETAS[0]) * grad
    v *= BETAS[1]
    v += (1 - BETAS[1]) * grad * grad
    m_hat = m / (1 - BETAS[0] ** t)
    v_hat = v / (1 - BETAS[1] ** t)
    return lr * m_hat / (np.sqrt(v_hat) + EPS)
