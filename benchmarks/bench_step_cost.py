"""Training efficiency of the cost model: achieved GFLOPS of a real LoRA step / matmul GFLOPS.

profiles/tiers.json `training_efficiency` converts a device's sustained matmul GFLOPS (what the profiler
measures, or a catalog figure) into LoRA training step time. This measures both on this machine,
interleaved (the machine is shared: compare as a ratio within one run): a 1024x1024 float32 matmul,
and MiniLM with LoRA on the default targets, AdamW, at each tier's batch x seq; FLOPs per step from
profiles/cost.py.

    .venv/bin/python benchmarks/bench_step_cost.py [--rounds 3] [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def matmul_gflops(n: int = 1024, reps: int = 10) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per tier and round (after one warm-up)")
    args = parser.parse_args()
    from hetlora.output import configure

    configure(-1)  # third-party import chatter (torchao, pytree) off, as in the hetlora command
    sys.path.insert(0, str(ROOT))
    import torch

    from edge_client.lora import inject_lora, set_rank
    from hetlora.models.bundled import default_model_dir
    from hetlora.models.folders import default_targets
    from hetlora.models.task_model import load_task_model
    from profiles.cost import step_flops
    from profiles.memory_model import ModelShape
    from profiles.policy import load_policy, tiers_of

    model_dir = default_model_dir()
    shape = ModelShape.from_model_dir(model_dir)
    model = load_task_model(model_dir, "classification", 77)
    inject_lora(model, default_targets(model_dir), 4, alpha=16)
    model.train()
    tiers = tiers_of(load_policy())[1:]
    gflops, times = [], {t.name: [] for t in tiers}
    for _ in range(args.rounds):
        for t in tiers:
            set_rank(model, t.rank, alpha=16)
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-4)
            ids = torch.randint(1000, 30000, (t.batch_size, t.seq_len))
            labels = torch.randint(0, 77, (t.batch_size,))
            for step in range(args.steps + 1):
                start = time.perf_counter()
                model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if step:
                    times[t.name].append(time.perf_counter() - start)
            gflops.append(matmul_gflops())
    peak = statistics.median(gflops)
    print(f"matmul 1024^2 float32, {torch.get_num_threads()} threads: median {peak:.1f} GFLOPS "
          f"(min {min(gflops):.1f}, max {max(gflops):.1f})\n")
    print(f"{'tier':>4} {'batch':>5} {'seq':>4} {'GFLOP/step':>10} {'step s':>7} {'GFLOPS':>7} {'efficiency':>10}")
    effs = []
    for t in tiers:
        flops = step_flops(shape, t.batch_size, t.seq_len, shape.default_lora_params(t.rank))
        step = statistics.median(times[t.name])
        effs.append(flops / step / 1e9 / peak)
        print(f"{t.name:>4} {t.batch_size:>5} {t.seq_len:>4} {flops / 1e9:>10.1f} {step:>7.3f} "
              f"{flops / step / 1e9:>7.1f} {effs[-1]:>10.2f}")
    print(f"\nmedian efficiency {statistics.median(effs):.2f} (tiers.json training_efficiency)")


if __name__ == "__main__":
    main()
