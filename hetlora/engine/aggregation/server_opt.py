"""Server-side optimisers on the aggregated update (Reddi et al., ICLR 2021, "Adaptive Federated
Optimization"): the rule's new global is read as a pseudo-gradient step from the previous one.

The update of round t, per tensor x (every lora_A, lora_B and dense tensor):
    d_t = rule.aggregate(x_{t-1}, uploads) - x_{t-1}
and the optimiser sets x_t = x_{t-1} + lr * u_t with
    momentum  m_t = beta1 m_{t-1} + d_t,                                 u_t = m_t
    adam      m_t = beta1 m_{t-1} + (1 - beta1) d_t,
              v_t = beta2 v_{t-1} + (1 - beta2) d_t^2,                   u_t = m_t / (sqrt(v_t) + tau)
    yogi      as adam with v_t = v_{t-1} - (1 - beta2) d_t^2 sign(v_{t-1} - d_t^2)
(element-wise; no bias correction, as in the paper). With momentum, lr = 1 and beta1 = 0 this is the
rule itself.

fedavg, hetlora and plora keep the components of their factors in place from round to round, so the
factors are the optimised tensors. hlora re-bases its factors by an SVD every round, so factor
differences mean nothing there; its LoRA update is the product dW_t = B_t A_t - B_{t-1} A_{t-1}, and
only momentum is offered: the buffer M_t = beta1 M_{t-1} + dW_t and the new product
B_{t-1} A_{t-1} + lr M_t are both kept at the global rank R by a factored truncated SVD (never the
dense out x in matrix; the truncation makes it an approximation whenever the sum exceeds rank R).
Adam and Yogi would need element-wise moments of the dense product, which this rule avoids.
The optimiser state is a dict of float32 arrays (safetensors-ready). Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hetlora.protocol.wire import LORA_A, LORA_B, Adapter
from hetlora.engine.aggregation.linalg import truncated_svd_of_product

OPTIMIZERS = ("none", "momentum", "adam", "yogi")


@dataclass(frozen=True)
class ServerOptimizer:
    name: str = "none"
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {self.name!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.lr <= 0 or not 0 <= self.beta1 < 1 or not 0 <= self.beta2 < 1 or self.tau <= 0:
            raise ValueError("server optimizer: lr and tau must be positive, beta1 and beta2 in [0, 1)")

    def check_rule(self, rule_name: str) -> None:
        if rule_name == "hlora" and self.name in ("adam", "yogi"):
            raise ValueError("hlora supports the momentum server optimizer only: its update is the product B A, "
                             "and adam/yogi would need element-wise moments of the dense out x in matrix")

    def step(self, previous: Adapter, aggregated: Adapter, state: dict[str, np.ndarray],
             product_space: bool) -> tuple[Adapter, dict[str, np.ndarray]]:
        """(new global, new state) from the previous global, the rule's aggregate and the previous state."""
        if self.name == "none":
            return aggregated, state
        self.check_rule("hlora" if product_space else "")
        new_state: dict[str, np.ndarray] = {}
        dense = {name: self._elementwise(name, previous.dense[name], t, state, new_state)
                 for name, t in aggregated.dense.items()}
        lora = {}
        for name, (a, b) in aggregated.lora.items():
            prev_a, prev_b = previous.lora[name]
            if product_space:
                lora[name] = self._product_momentum(name, (prev_a, prev_b), (a, b), state, new_state)
            else:
                lora[name] = (self._elementwise(name + LORA_A, prev_a, a, state, new_state),
                              self._elementwise(name + LORA_B, prev_b, b, state, new_state))
        return Adapter(lora=lora, dense=dense, meta=dict(aggregated.meta)), new_state

    def _elementwise(self, key: str, previous: np.ndarray, aggregated: np.ndarray, state: dict,
                     new_state: dict) -> np.ndarray:
        x = np.asarray(previous, dtype=np.float64)
        d = np.asarray(aggregated, dtype=np.float64) - x
        m = np.asarray(state.get(f"m/{key}", np.zeros_like(x)), dtype=np.float64)
        if self.name == "momentum":
            m = self.beta1 * m + d
            u = m
        else:
            m = self.beta1 * m + (1 - self.beta1) * d
            v = np.asarray(state.get(f"v/{key}", np.zeros_like(x)), dtype=np.float64)
            d2 = d * d
            v = self.beta2 * v + (1 - self.beta2) * d2 if self.name == "adam" else v - (1 - self.beta2) * d2 * np.sign(v - d2)
            new_state[f"v/{key}"] = v.astype(np.float32)
            u = m / (np.sqrt(v) + self.tau)
        new_state[f"m/{key}"] = m.astype(np.float32)
        return (x + self.lr * u).astype(np.float32)

    def _product_momentum(self, name: str, previous, aggregated, state: dict, new_state: dict):
        """hlora: momentum on dW = B A, every product kept at rank R in factored form."""
        prev_a, prev_b = (np.asarray(t, dtype=np.float64) for t in previous)
        agg_a, agg_b = (np.asarray(t, dtype=np.float64) for t in aggregated)
        rank = prev_a.shape[0]
        # M_t = beta1 M_{t-1} + B_t A_t - B_{t-1} A_{t-1}, as one product of stacked factors.
        b_parts, a_parts = [agg_b, -prev_b], [agg_a, prev_a]
        if f"mB/{name}" in state:
            b_parts.append(self.beta1 * np.asarray(state[f"mB/{name}"], dtype=np.float64))
            a_parts.append(np.asarray(state[f"mA/{name}"], dtype=np.float64))
        m_b, m_a = _truncate(np.hstack(b_parts), np.vstack(a_parts), rank)
        new_state[f"mB/{name}"], new_state[f"mA/{name}"] = m_b.astype(np.float32), m_a.astype(np.float32)
        new_b, new_a = _truncate(np.hstack([prev_b, self.lr * m_b]), np.vstack([prev_a, m_a]), rank, filler=agg_a)
        return new_a.astype(np.float32), new_b.astype(np.float32)


def _truncate(b: np.ndarray, a: np.ndarray, rank: int, filler: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The best rank-`rank` factors (B', A') of B @ A (balanced split). Components beyond the product's
    rank get B'_j = 0 and A'_j = filler_j (0 without a filler; as hlora does, so they stay trainable)."""
    u, s, vt = truncated_svd_of_product(b, a, rank)
    root = np.sqrt(s)
    new_b = np.zeros((b.shape[0], rank))
    new_a = np.zeros((rank, a.shape[1])) if filler is None else np.array(filler, dtype=np.float64)
    new_b[:, : s.size] = u * root[None, :]
    new_a[: s.size] = root[:, None] * vt
    return new_b, new_a
