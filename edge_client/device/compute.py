"""Compute speed: matmul GFLOPS with torch, and optionally the time of one real LoRA training step.

An n x n float32 matmul is 2 n^3 floating-point operations.
- peak: the best rate over short bursts (each about 0.1 s) during `peak_s`;
- sustained: total operations / elapsed time of back-to-back matmuls over the next `sustained_s`
  (long enough, with `full`, for a device to heat up and throttle).
torch is imported only when measuring.
"""

from __future__ import annotations

import statistics
import time

from edge_client.data import Examples
from hetlora.models.bundled import default_model_dir
from hetlora.protocol.settings import TrainingSettings
from edge_client.model_check import head_labels

SHORT = {"peak_s": 1.0, "sustained_s": 2.0}
FULL = {"peak_s": 5.0, "sustained_s": 55.0}
BURST_S = 0.1


def matmul_gflops(peak_s: float, sustained_s: float, n: int = 1024) -> dict:
    """{"peak_gflops", "sustained_gflops", "duration_s"} of repeated n x n float32 matmuls."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    flops = 2.0 * n ** 3
    start = time.perf_counter()
    torch.mm(a, b)  # warm-up: thread pool and kernels
    per_burst = max(1, int(BURST_S / max(time.perf_counter() - start, 1e-6)))
    best = 0.0
    deadline = time.perf_counter() + peak_s
    while True:
        t = time.perf_counter()
        for _ in range(per_burst):
            torch.mm(a, b)
        best = max(best, per_burst * flops / (time.perf_counter() - t))
        if time.perf_counter() >= deadline:
            break
    count, t = 0, time.perf_counter()
    while count == 0 or time.perf_counter() - t < sustained_s:
        torch.mm(a, b)
        count += 1
    sustained = count * flops / (time.perf_counter() - t)
    return {"peak_gflops": round(best / 1e9, 2), "sustained_gflops": round(sustained / 1e9, 2),
            "duration_s": round(time.perf_counter() - start, 2)}


def lora_step_seconds(model_dir=None, task: str = "classification", *, rank: int = 4, batch_size: int = 8,
                      seq_len: int = 64, steps: int = 4) -> float:
    """Median time of one LoRA training step (AdamW) of `task`'s model (default: its bundled one) with the torch
    backend. Runs `steps` real steps on full-length synthetic rows (causal-lm: chat rows, the reply a third of
    the row); the first is warm-up and excluded. A classification head saved in the folder is trained as it is.
    """
    # the torch training stack, like torch above, only when measuring
    from edge_client.lora import extract_adapter, set_rank
    from edge_client.training import TorchTrainer

    if steps < 2:
        raise ValueError("need at least 2 steps (the first is warm-up)")
    model_dir = model_dir or default_model_dir(task)
    labels = [f"label {i}" for i in range(max(head_labels(model_dir) or 2, 2))] if task == "classification" else None
    trainer = TorchTrainer(model_dir, task, labels=labels)
    set_rank(trainer.model, rank, trainer.lora_alpha)
    start = extract_adapter(trainer.model, trainer.dense)
    rows = batch_size * steps
    text = " ".join(["device profile measures one training step"] * seq_len)
    examples = (Examples(task, (text,) * rows, tuple(i % 2 for i in range(rows))) if labels else
                Examples(task, (text,) * rows, responses=(text[: len(text) // 2],) * rows, chat=True))
    stamps: list[float] = []
    trainer.train_round(start, examples, TrainingSettings(steps=steps, batch_size=batch_size, seq_len=seq_len),
                        rank=rank, on_step=lambda step, loss: stamps.append(time.perf_counter()))
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
