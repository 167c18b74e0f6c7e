"""FLOPs of one LoRA training step and upload bytes of a rank (pure arithmetic on the model's shape).

The step count is profiles.cost.step_flops (one formula for the whole project), over T = batch * seq_len:

    flops = 4 * P_mm * T  +  6 * P_lora * T  +  12 * L * batch * seq_len^2 * h

- frozen linear maps of the L layers (P_mm parameters): forward 2 P T, backward activation gradients
  2 P T, no weight gradients (they are frozen);
- LoRA factors at the computed rank (P_lora = sum over adapted modules of r (in + out)): forward 2,
  activation gradient 2 and weight gradient 2 per parameter and token;
- attention QK^T and softmax(.)V: 4 b s^2 h per layer forward, three times that with backward.
Embedding lookups, LayerNorm, softmax, GELU, the pooler and the classification head (per row, not per
token) are left out. The count includes the input gradients of the first layer's linear maps, which
autograd skips (the embedding output needs no gradient): an overcount of about 2% for MiniLM-L6.
tests/client/test_bench.py reconciles it term by term with torch's FlopCounterMode on a real step.

Upload bytes at rank r: 4 * (P_lora(r) + P_dense), float32 on the wire.
"""

from __future__ import annotations

from hetlora.protocol.spec import AdapterSpec
from profiles.cost import step_flops, upload_bytes
from profiles.memory_model import ModelShape


def training_step_flops(shape: ModelShape, spec: AdapterSpec, rank: int, batch: int, seq_len: int) -> float:
    """FLOPs of one forward + backward step at LoRA rank `rank` (the rank the kernels compute at)."""
    return step_flops(shape, batch, seq_len, spec.lora_parameter_count(rank))


def rank_upload_bytes(spec: AdapterSpec, rank: int) -> int:
    """Bytes of the float32 tensors a client uploads at `rank`: LoRA factors plus dense tensors."""
    return upload_bytes(spec.lora_parameter_count(rank), spec.dense_parameter_count())
