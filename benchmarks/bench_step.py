"""Training step time and peak memory: the torch backend vs Hugging Face PEFT, same model and batch.

classification (default): MiniLM-L6 with a new 77-way head, batch 16, seq 64 (banking77 rows padded to 64).
chat (`--task chat`): SmolLM2-135M-Instruct, batch 8, seq 64, chitchat (prompt, reply) pairs through the chat
template, the loss on reply tokens only (PEFT gets the same masked labels).
Both: AdamW, dropout off, LoRA on the project's default targets, ranks 4..64, the same padded batches
(no trimming). Each (backend, rank) runs in a fresh subprocess so peak RSS belongs to that configuration
alone. Prints median step time, ours / PEFT ratio, and peak RSS.
`--interleaved` instead times both in one process, alternating step by step (a fair ratio on a
busy shared machine; no per-configuration RSS). `--threads N` sets torch's intra-op threads.

    .venv/bin/python benchmarks/bench_step.py [--task chat] [--ranks 4,8,16,32,64] [--steps 12] [--interleaved]
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
SEQ, LR, WARMUP = 64, 5e-4, 2
BATCH = {"classification": 16, "chat": 8}
TASK = {"classification": "classification", "chat": "causal-lm"}


def _examples(task: str, rows: int):
    """`rows` examples of the task spread over its data: banking77 training rows, or chitchat replies."""
    from edge_client.data import Examples, load_examples

    if task == "classification":
        labels = json.loads((ROOT / "hetlora/data/banking77/categories.json").read_text())
        examples = load_examples(ROOT / "hetlora/data/banking77/train.csv", "classification", labels)
    else:
        from hetlora.chitchat import chitchat_rows

        labels, chat = None, chitchat_rows()
        examples = Examples("causal-lm", tuple(r["prompt"] for r in chat), responses=tuple(r["response"] for r in chat),
                            chat=True)
    return labels, examples.subset(range(0, len(examples), len(examples) // rows))


def _setup(task: str, rank: int):
    """Model folder, labels, a few rows and the rank-`rank` start adapter (B = 0)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from hetlora.models.adapter_spec import derive_spec
    from hetlora.models.bundled import default_model_dir
    from hetlora.protocol.wire import Adapter

    torch.manual_seed(0)
    model_dir = default_model_dir(TASK[task])
    labels, examples = _examples(task, BATCH[task] * 4)
    spec = derive_spec(model_dir, TASK[task], num_labels=len(labels) if labels else None)
    start = Adapter(lora={n: (torch.randn(rank, m.in_features).mul_(0.02).numpy(),
                              torch.zeros(m.out_features, rank).numpy()) for n, m in spec.modules.items()})
    return model_dir, labels, examples, start


def _ours_step(task, model_dir, labels, start):
    """The torch backend's own training step (TorchTrainer.stepper), plain mode, padded batches."""
    from hetlora.protocol.settings import TrainingSettings
    from edge_client.training import TorchTrainer

    trainer = TorchTrainer(model_dir, TASK[task], labels, lora_alpha=16)
    return trainer.stepper(start, TrainingSettings(batch_size=BATCH[task], seq_len=SEQ, lr=LR, trim_padding=False))


def _peft_step(task, model_dir, labels, rank):
    """One AdamW step of a PEFT LoRA model on the same targets, dropout off."""
    import torch
    from peft import LoraConfig, get_peft_model

    from hetlora.models.folders import default_targets
    from hetlora.models.task_model import load_task_model

    config = LoraConfig(r=rank, lora_alpha=16, lora_dropout=0.0, target_modules=list(default_targets(model_dir)),
                        task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM")
    base = load_task_model(model_dir, TASK[task], len(labels) if labels else None)
    model = get_peft_model(base, config).eval()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

    def step(batch: dict) -> float:
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def _batches(task, model_dir, examples, steps: int):
    from edge_client.data import encode, training_batches
    from hetlora.models.task_model import load_tokenizer

    return training_batches(encode(examples, load_tokenizer(model_dir), SEQ), BATCH[task], seed=0,
                            steps=steps + WARMUP)


def _timed(step, batch) -> float:
    t = time.perf_counter()
    step(batch)
    return time.perf_counter() - t


def worker(task: str, backend: str, rank: int, steps: int) -> dict:
    model_dir, labels, examples, start = _setup(task, rank)
    step = (_ours_step(task, model_dir, labels, start) if backend == "ours"
            else _peft_step(task, model_dir, labels, rank))
    times = [_timed(step, batch) for batch in _batches(task, model_dir, examples, steps)][WARMUP:]
    return {"times_s": times, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def interleaved(task: str, rank: int, steps: int) -> tuple[float, float]:
    """Median step seconds (ours, peft), the two models stepping alternately on the same batches."""
    model_dir, labels, examples, start = _setup(task, rank)
    step_fns = (_ours_step(task, model_dir, labels, start), _peft_step(task, model_dir, labels, rank))
    times: list[list[float]] = [[], []]
    for i, batch in enumerate(_batches(task, model_dir, examples, steps)):
        for k, step in enumerate(step_fns):
            elapsed = _timed(step, batch)
            if i >= WARMUP:
                times[k].append(elapsed)
    return statistics.median(times[0]), statistics.median(times[1])


def run_worker(task: str, backend: str, rank: int, steps: int, threads: int | None) -> dict:
    extra = ["--threads", str(threads)] if threads else []
    out = subprocess.run([sys.executable, __file__, "--task", task, *extra, "--worker", backend, str(rank), str(steps)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(task: str, rank: int, steps: int, repeats: int, threads: int | None) -> dict[str, dict]:
    """Alternate the two backends' subprocesses (ours first on even repeats) so load drift hits both alike;
    pool the step times (median) and keep the largest peak RSS."""
    runs: dict[str, list[dict]] = {"ours": [], "peft": []}
    for rep in range(repeats):
        for backend in ("ours", "peft") if rep % 2 == 0 else ("peft", "ours"):
            runs[backend].append(run_worker(task, backend, rank, steps, threads))
    return {b: {"median_s": statistics.median(t for r in rs for t in r["times_s"]),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)} for b, rs in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=tuple(BATCH), default="classification")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--ranks", default="4,8,16,32,64")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per configuration (after 2 warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="subprocess runs per backend and rank, alternating")
    parser.add_argument("--interleaved", action="store_true", help="one process, alternating steps; no RSS")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from hetlora.output import configure

    configure(-1)  # third-party import chatter (torchao, pytree) off, as in the hetlora command
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.worker:
        backend, rank, steps = args.worker
        print(json.dumps(worker(args.task, backend, int(rank), int(steps))))
        return
    model = "MiniLM-L6" if args.task == "classification" else "SmolLM2-135M-Instruct on chat rows"
    setting = f"{model}, batch {BATCH[args.task]}, seq {SEQ}, AdamW, dropout off, threads {args.threads or 'default'}"
    if args.interleaved:
        print(f"{setting}; interleaved steps, median of {args.steps}")
        print(f"{'rank':>4} {'ours ms':>8} {'peft ms':>8} {'ratio':>6}")
        for rank in [int(r) for r in args.ranks.split(",")]:
            ours_s, peft_s = interleaved(args.task, rank, args.steps)
            print(f"{rank:>4} {ours_s * 1e3:>8.0f} {peft_s * 1e3:>8.0f} {ours_s / peft_s:>6.2f}", flush=True)
        return
    print(f"{setting}, default targets; median of {args.repeats} x {args.steps} steps")
    print(f"{'rank':>4} {'ours ms':>8} {'peft ms':>8} {'ratio':>6} {'ours MB':>8} {'peft MB':>8}")
    for rank in [int(r) for r in args.ranks.split(",")]:
        result = measure(args.task, rank, args.steps, args.repeats, args.threads)
        ours, peft = result["ours"], result["peft"]
        print(f"{rank:>4} {ours['median_s'] * 1e3:>8.0f} {peft['median_s'] * 1e3:>8.0f} "
              f"{ours['median_s'] / peft['median_s']:>6.2f} {ours['peak_rss_mb']:>8.0f} {peft['peak_rss_mb']:>8.0f}",
              flush=True)


if __name__ == "__main__":
    main()
