"""Memory model vs measured peak RSS of real LoRA training steps of the torch backend.

Each configuration runs in a fresh subprocess: the client's TorchTrainer on the task's default model
(MiniLM with a 77-way head, or SmolLM2-135M-Instruct), AdamW over the LoRA factors (and the head), two
training steps on random token ids (causal-lm: targets on the last third of each row, as a chat reply),
then the peak RSS from resource.getrusage (ru_maxrss). Prints predicted, measured and error %, and a
least-squares fit of the calibration constants of profiles/memory_model.py over the rows run.

    .venv/bin/python benchmarks/bench_memory.py [--ranks 4,8,16,32,64] [--shapes 8x64,16x128]
    .venv/bin/python benchmarks/bench_memory.py --task causal-lm --ranks 4,8,32 --shapes 4x64,8x64,8x128
    .venv/bin/python benchmarks/bench_memory.py --task causal-lm --ranks 8 --shapes 4x64,8x64,8x128,16x128 \
        --activation-checkpointing      # each layer recomputed in backward: its own workspace factor
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUM_LABELS = 77  # banking77, the demo's task
TARGETS = 1 / 3  # causal-lm: the share of positions with a target in the worker's batches


def training_step(task: str, rank: int, batch: int, seq_len: int, checkpointing: bool = False):
    """(trainer, step, batch): the client's TorchTrainer on the task's default model, its AdamW step at `rank`
    and one batch of random token ids (causal-lm: targets on the last TARGETS share of each row, as a reply)."""
    import torch

    from hetlora.models.bundled import default_model_dir
    from edge_client.training import TorchTrainer
    from hetlora.protocol.settings import TrainingSettings
    from hetlora.engine.aggregation import make_rule
    from hetlora.models.adapter_spec import derive_spec

    torch.manual_seed(0)
    model_dir = default_model_dir(task)
    labels = [str(i) for i in range(NUM_LABELS)] if task == "classification" else None
    trainer = TorchTrainer(model_dir, task, labels=labels)
    spec = derive_spec(model_dir, task, num_labels=NUM_LABELS if labels else None)
    settings = TrainingSettings(batch_size=batch, seq_len=seq_len, activation_checkpointing=checkpointing)
    step = trainer.stepper(make_rule("fedavg").init_global(spec, rank, 0), settings)
    ids = torch.randint(1000, 30000, (batch, seq_len))
    if task == "classification":
        targets = torch.randint(0, NUM_LABELS, (batch,))
    else:
        targets = ids.clone()
        targets[:, : round((1 - TARGETS) * seq_len)] = -100
    return trainer, step, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": targets}


def worker(task: str, rank: int, batch: int, seq_len: int, checkpointing: bool = False) -> dict:
    """Run two real training steps and return the peak RSS in bytes (Linux reports ru_maxrss in KiB)."""
    import resource

    _, step, data = training_step(task, rank, batch, seq_len, checkpointing)
    for _ in range(2):
        step(data)
    return {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def measure(task: str, rank: int, batch: int, seq_len: int, checkpointing: bool) -> int:
    flags = ["--activation-checkpointing"] if checkpointing else []
    out = subprocess.run([sys.executable, __file__, "--task", task, "--worker", str(rank), str(batch), str(seq_len),
                          *flags], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="4,8,16,32,64")
    parser.add_argument("--shapes", default="8x64,16x128", help="batch x seq_len settings")
    parser.add_argument("--task", choices=("classification", "causal-lm"), default="classification")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="train with activation checkpointing (and fit its workspace factor)")
    parser.add_argument("--worker", nargs=3, type=int, metavar=("RANK", "BATCH", "SEQ"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    from hetlora.output import configure

    configure(-1)  # third-party import chatter (torchao, pytree) off, as in the hetlora command
    sys.path.insert(0, str(ROOT))
    if args.worker:
        print(json.dumps(worker(args.task, *args.worker, args.activation_checkpointing)))
        return

    from hetlora.models.bundled import default_model_dir
    from profiles.memory_model import RUNTIME_BYTES, ModelShape, predict_peak_memory, saved_activation_bytes

    task, checkpointing = args.task, args.activation_checkpointing
    shape = ModelShape.from_model_dir(default_model_dir(task))
    dense = shape.hidden * NUM_LABELS + NUM_LABELS if task == "classification" else 0
    per_layer = len(shape.default_lora_modules())
    ranks = [int(r) for r in args.ranks.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = []
    print(f"{'rank':>4} {'batch':>5} {'seq':>4} {'predicted MB':>12} {'measured MB':>11} {'error %':>7}")
    for batch, seq_len in shapes:
        for rank in ranks:
            predicted = predict_peak_memory(shape, rank, batch, seq_len, dense_params=dense, task=task,
                                            target_fraction=TARGETS, activation_checkpointing=checkpointing).total
            measured = measure(task, rank, batch, seq_len, checkpointing)
            rows.append((rank, batch, seq_len, measured))
            print(f"{rank:>4} {batch:>5} {seq_len:>4} {predicted / 1e6:>12.0f} {measured / 1e6:>11.0f} "
                  f"{100 * (predicted - measured) / measured:>+7.1f}", flush=True)
    # Calibration: measured - (weights + trainable state) = runtime + workspace * saved, least squares over all rows.
    import numpy as np

    fixed = [predict_peak_memory(shape, r, b, s, dense_params=dense, task=task, runtime_bytes=0,
                                 workspace_factor=0).total for r, b, s, _ in rows]
    saved = np.array([saved_activation_bytes(shape, b, s, r, per_layer, task=task, target_fraction=TARGETS,
                                             checkpointed=checkpointing) for r, b, s, _ in rows], dtype=float)
    excess = np.array([m - f for (*_, m), f in zip(rows, fixed)], dtype=float)
    if checkpointing:  # the runtime constant is the one fitted without checkpointing
        factor = float(saved @ (excess - RUNTIME_BYTES) / (saved @ saved))
        print(f"\nleast-squares fit over these {len(rows)} rows, RUNTIME_BYTES held at {RUNTIME_BYTES}: "
              f"checkpointed workspace factor = {factor:.3f} (the model uses the values in profiles/memory_model.py)")
        return
    (runtime, factor), *_ = np.linalg.lstsq(np.column_stack([np.ones(len(rows)), saved]), excess, rcond=None)
    print(f"\nleast-squares fit over these {len(rows)} rows: RUNTIME_BYTES = {runtime:.0f}, "
          f"workspace factor = {factor:.3f} (the model uses the values in profiles/memory_model.py)")

if __name__ == "__main__":
    main()
