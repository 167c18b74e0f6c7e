"""Training step time and peak memory: the torch backend vs Hugging Face PEFT, same model and batch.

MiniLM-L6 (the default model) with a new 77-way head, batch 16, seq 64 (banking77 rows padded
to 64), AdamW, dropout off in both, LoRA on the project's default targets, ranks 4..64. Each
(backend, rank) runs in a fresh subprocess so peak RSS belongs to that configuration alone.
Prints median step time, ours / PEFT ratio, and peak RSS.
`--interleaved` instead times both in one process, alternating step by step (a fair ratio on a
busy shared machine; no per-configuration RSS).

    .venv/bin/python benchmarks/bench_step.py [--ranks 4,8,16,32,64] [--steps 12] [--interleaved]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH, SEQ, LR, WARMUP = 16, 64, 5e-4, 2


def _setup(rank: int):
    """Model folder, labels, a few banking77 rows and the rank-`rank` start adapter (B = 0)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from edge_client.data import load_examples
    from hetlora.models.adapter_spec import derive_spec
    from hetlora.models.bundled import default_model_dir
    from hetlora.protocol.wire import Adapter

    torch.manual_seed(0)
    model_dir = default_model_dir()
    labels = json.loads((ROOT / "hetlora/data/banking77/categories.json").read_text())
    examples = load_examples(ROOT / "hetlora/data/banking77/train.csv", "classification", labels)
    examples = examples.subset(range(0, len(examples), len(examples) // (BATCH * 4)))
    spec = derive_spec(model_dir, "classification", num_labels=len(labels))
    start = Adapter(lora={n: (torch.randn(rank, m.in_features).mul_(0.02).numpy(),
                              torch.zeros(m.out_features, rank).numpy()) for n, m in spec.modules.items()})
    return model_dir, labels, examples, start


def _ours_step(model_dir, labels, start):
    """The torch backend's own training step (TorchTrainer.stepper), plain mode."""
    from hetlora.protocol.settings import TrainingSettings
    from edge_client.training import TorchTrainer

    trainer = TorchTrainer(model_dir, "classification", labels, lora_alpha=16)
    return trainer.stepper(start, TrainingSettings(batch_size=BATCH, seq_len=SEQ, lr=LR))


def _peft_step(model_dir, labels, rank):
    """One AdamW step of a PEFT LoRA model on the same targets, dropout off."""
    import torch
    from peft import LoraConfig, get_peft_model

    from hetlora.models.folders import default_targets

    from hetlora.models.task_model import load_task_model

    config = LoraConfig(r=rank, lora_alpha=16, lora_dropout=0.0, target_modules=list(default_targets(model_dir)),
                        task_type="SEQ_CLS")
    model = get_peft_model(load_task_model(model_dir, "classification", len(labels)), config).eval()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

    def step(batch: dict) -> float:
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def _batches(model_dir, examples, steps: int):
    from edge_client.data import encode, training_batches
    from hetlora.models.task_model import load_tokenizer

    return training_batches(encode(examples, load_tokenizer(model_dir), SEQ), BATCH, seed=0, steps=steps + WARMUP)


def _timed(step, batch) -> float:
    t = time.perf_counter()
    step(batch)
    return time.perf_counter() - t


def worker(backend: str, rank: int, steps: int) -> dict:
    model_dir, labels, examples, start = _setup(rank)
    step = _ours_step(model_dir, labels, start) if backend == "ours" else _peft_step(model_dir, labels, rank)
    times = [_timed(step, batch) for batch in _batches(model_dir, examples, steps)][WARMUP:]
    return {"times_s": times, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def interleaved(rank: int, steps: int) -> tuple[float, float]:
    """Median step seconds (ours, peft), the two models stepping alternately on the same batches."""
    model_dir, labels, examples, start = _setup(rank)
    step_fns = (_ours_step(model_dir, labels, start), _peft_step(model_dir, labels, rank))
    times: list[list[float]] = [[], []]
    for i, batch in enumerate(_batches(model_dir, examples, steps)):
        for k, step in enumerate(step_fns):
            elapsed = _timed(step, batch)
            if i >= WARMUP:
                times[k].append(elapsed)
    return statistics.median(times[0]), statistics.median(times[1])


def run_worker(backend: str, rank: int, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", backend, str(rank), str(steps)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(rank: int, steps: int, repeats: int) -> dict[str, dict]:
    """Alternate the two backends' subprocesses (ours first on even repeats) so load drift hits both alike;
    pool the step times (median) and keep the largest peak RSS."""
    runs: dict[str, list[dict]] = {"ours": [], "peft": []}
    for rep in range(repeats):
        for backend in ("ours", "peft") if rep % 2 == 0 else ("peft", "ours"):
            runs[backend].append(run_worker(backend, rank, steps))
    return {b: {"median_s": statistics.median(t for r in rs for t in r["times_s"]),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)} for b, rs in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="4,8,16,32,64")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per configuration (after 2 warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="subprocess runs per backend and rank, alternating")
    parser.add_argument("--interleaved", action="store_true", help="one process, alternating steps; no RSS")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from hetlora.output import configure

    configure(-1)  # third-party import chatter (torchao, pytree) off, as in the hetlora command
    if args.worker:
        backend, rank, steps = args.worker
        print(json.dumps(worker(backend, int(rank), int(steps))))
        return
    if args.interleaved:
        print(f"MiniLM-L6, batch {BATCH}, seq {SEQ}, AdamW, dropout off; interleaved steps, median of {args.steps}")
        print(f"{'rank':>4} {'ours ms':>8} {'peft ms':>8} {'ratio':>6}")
        for rank in [int(r) for r in args.ranks.split(",")]:
            ours_s, peft_s = interleaved(rank, args.steps)
            print(f"{rank:>4} {ours_s * 1e3:>8.0f} {peft_s * 1e3:>8.0f} {ours_s / peft_s:>6.2f}", flush=True)
        return
    print(f"MiniLM-L6, batch {BATCH}, seq {SEQ}, AdamW, dropout off, default targets; median of {args.repeats} x {args.steps} steps")
    print(f"{'rank':>4} {'ours ms':>8} {'peft ms':>8} {'ratio':>6} {'ours MB':>8} {'peft MB':>8}")
    for rank in [int(r) for r in args.ranks.split(",")]:
        result = measure(rank, args.steps, args.repeats)
        ours, peft = result["ours"], result["peft"]
        print(f"{rank:>4} {ours['median_s'] * 1e3:>8.0f} {peft['median_s'] * 1e3:>8.0f} "
              f"{ours['median_s'] / peft['median_s']:>6.2f} {ours['peak_rss_mb']:>8.0f} {peft['peak_rss_mb']:>8.0f}",
              flush=True)


if __name__ == "__main__":
    main()
