"""Memory levers of the torch backend on the chat model: peak RSS and step time of one configuration against the
others, side by side.

Levers (each a fresh process running the client's TorchTrainer, AdamW over the LoRA factors, a warm-up step then
timed steps on random token ids with targets on the last third of each row, as a chat reply):

    plain            every linear layer of every block adapted, float32 base (the default)
    checkpointing    plain + activation checkpointing (what the tier policy turns on when a tier needs it)
    bf16-base        the frozen base in bfloat16, the LoRA factors and their optimiser in float32
    top-half         LoRA on the upper half of the layers only (backward stops there)
    checkpointing+top-half

The configurations run interleaved, `--repeats` times, so a load change hits all of them. Prints peak RSS (MB,
ru_maxrss), median step seconds and both against plain. The product ships `checkpointing`; the others are
measured here to show why not (docs/EXPORT.md, "Memory levers").

    .venv/bin/python benchmarks/bench_memory_levers.py --shapes 8x64,8x128 --repeats 2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEVERS = ("plain", "checkpointing", "bf16-base", "top-half", "checkpointing+top-half")


def bf16_base(model) -> None:
    """Frozen weights in bfloat16, LoRA factors left in float32; the LoRA branch computes in float32 (this
    measurement's own forward: the product keeps its base in float32)."""
    import torch
    from torch.nn import functional as F

    from edge_client.lora import LoRALinear

    def forward(self, x):
        z = F.linear(x.float(), self.lora_A) * self.scale
        return self.base(x) + F.linear(z, self.lora_B).to(x.dtype)

    LoRALinear.forward = forward
    for module in model.modules():
        if not isinstance(module, LoRALinear):
            for name, p in module.named_parameters(recurse=False):
                if not name.startswith("lora_"):
                    p.data = p.data.to(torch.bfloat16)


def worker(lever: str, rank: int, batch: int, seq_len: int, steps: int, threads: int) -> dict:
    import resource

    import torch

    from benchmarks.bench_memory import training_step
    from edge_client.lora import lora_layers

    torch.set_num_threads(threads)
    trainer, step, data = training_step("causal-lm", rank, batch, seq_len, "checkpointing" in lever)
    if lever == "bf16-base":
        bf16_base(trainer.model)
    if "top-half" in lever:
        layers = trainer.model.config.num_hidden_layers
        for name, layer in lora_layers(trainer.model).items():
            if int(name.split(".layers.")[1].split(".")[0]) < layers // 2:
                layer.lora_A.requires_grad_(False)
                layer.lora_B.requires_grad_(False)
    step(data)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step(data)
        times.append(time.perf_counter() - t0)
    return {"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6,
            "step_s": statistics.median(times), "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levers", default=",".join(LEVERS))
    parser.add_argument("--shapes", default="8x64", help="batch x seq_len settings")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per process")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of every configuration")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from hetlora.output import configure

    configure(-1)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.worker:
        batch, seq_len = shapes[0]
        print(json.dumps(worker(args.worker, args.rank, batch, seq_len, args.steps, args.threads)))
        return
    levers = args.levers.split(",")
    unknown = sorted(set(levers) - set(LEVERS))
    if unknown:
        parser.error(f"unknown lever {unknown[0]!r}; choose from {', '.join(LEVERS)}")
    print(f"rank {args.rank}, {args.threads} threads, {args.steps} timed steps x {args.repeats} interleaved runs")
    print(f"{'batch x seq':>11} {'lever':<24} {'peak MB':>8} {'x plain':>7} {'step s':>7} {'x plain':>7} {'loss':>7}")
    for batch, seq_len in shapes:
        runs: dict[str, list[dict]] = {lever: [] for lever in levers}
        for _ in range(args.repeats):
            for lever in levers:
                out = subprocess.run([sys.executable, __file__, "--worker", lever, "--shapes", f"{batch}x{seq_len}",
                                      "--rank", str(args.rank), "--steps", str(args.steps), "--threads",
                                      str(args.threads)], cwd=ROOT, capture_output=True, text=True, check=True)
                runs[lever].append(json.loads(out.stdout.strip().splitlines()[-1]))
        summary = {lever: (max(r["peak_mb"] for r in rs), statistics.median(r["step_s"] for r in rs), rs[-1]["loss"])
                   for lever, rs in runs.items()}
        base = summary.get("plain")
        for lever, (peak, step_s, loss) in summary.items():
            mem_ratio = f"{peak / base[0]:.2f}" if base else "-"
            time_ratio = f"{step_s / base[1]:.2f}" if base else "-"
            print(f"{batch:>5} x {seq_len:<3} {lever:<24} {peak:>8.0f} {mem_ratio:>7} {step_s:>7.3f} {time_ratio:>7} "
                  f"{loss:>7.3f}", flush=True)


if __name__ == "__main__":
    main()
