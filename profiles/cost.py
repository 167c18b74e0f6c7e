"""Compute and upload cost of a LoRA training configuration (pure arithmetic).

FLOPs of one training step (forward + backward) over T = batch * seq_len tokens:

    flops = 4 * P_mm * T  +  6 * P_lora * T  +  12 * L * batch * seq_len^2 * h

- frozen linear maps (P_mm parameters, embedding lookups excluded): forward 2 P T, and backward still
  computes activation gradients through them (2 P T) but no weight gradients;
- LoRA factors (P_lora): forward 2, activation gradient 2, weight gradient 2 per parameter and token;
- attention scores and their product with V: 4 b s^2 h per layer forward, three times that with backward.

Activation checkpointing runs every layer's forward once more in backward:
+ 2 * (P_mm - P_head) * T + 2 * P_lora * T + 4 * L * batch * seq_len^2 * h (P_head: a causal LM's output head,
which is not recomputed).

Upload bytes of an adapter at rank r: 4 * (P_lora(r) + P_dense), float32 on the wire.
"""

from __future__ import annotations

from profiles.memory_model import ModelShape


def step_flops(shape: ModelShape, batch: int, seq_len: int, lora_params: int,
               activation_checkpointing: bool = False) -> float:
    tokens = batch * seq_len
    attention = 4 * shape.layers * batch * seq_len * seq_len * shape.hidden
    flops = 4.0 * shape.matmul_params * tokens + 6.0 * lora_params * tokens + 3 * attention
    if activation_checkpointing:
        layers = shape.matmul_params - shape.head_matmul_params
        flops += 2.0 * layers * tokens + 2.0 * lora_params * tokens + attention
    return flops


def step_seconds(flops: float, sustained_gflops: float, efficiency: float) -> float:
    """Step time from a matmul GFLOPS figure: a training step reaches `efficiency` of it."""
    return flops / (sustained_gflops * 1e9 * efficiency)


def upload_bytes(lora_params: int, dense_params: int = 0) -> int:
    return 4 * (lora_params + dense_params)


def upload_seconds(n_bytes: int, upload_mbps: float) -> float:
    return n_bytes * 8 / (upload_mbps * 1e6)
