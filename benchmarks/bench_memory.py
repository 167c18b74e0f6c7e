"""Memory model vs measured peak RSS of real LoRA training steps on MiniLM (the default model).

Each configuration runs in a fresh subprocess: load the model, inject LoRA on the default targets,
AdamW over the LoRA factors and the classification head, two training steps on random token ids,
then the peak RSS from resource.getrusage (ru_maxrss). Prints predicted, measured and error %, and
a least-squares fit of the two calibration constants of profiles/memory_model.py over the rows run.

    .venv/bin/python benchmarks/bench_memory.py [--ranks 4,8,16,32,64] [--shapes 8x64,16x128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUM_LABELS = 77  # banking77, the demo's task


def worker(rank: int, batch: int, seq_len: int) -> dict:
    """Run two real training steps and return the peak RSS in bytes (Linux reports ru_maxrss in KiB)."""
    import resource

    import torch

    from edge_client.lora import inject_lora
    from edge_client.models import default_model_dir, default_targets, dense_parameter_names, load_task_model

    torch.manual_seed(0)
    model_dir = default_model_dir()
    model = load_task_model(model_dir, "classification", NUM_LABELS)
    inject_lora(model, default_targets(model_dir), rank, alpha=16)
    for name, p in model.named_parameters():
        if name in dense_parameter_names(model, "classification"):
            p.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    ids = torch.randint(1000, 30000, (batch, seq_len))
    labels = torch.randint(0, NUM_LABELS, (batch,))
    for _ in range(2):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def measure(rank: int, batch: int, seq_len: int) -> int:
    out = subprocess.run([sys.executable, __file__, "--worker", str(rank), str(batch), str(seq_len)],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="4,8,16,32,64")
    parser.add_argument("--shapes", default="8x64,16x128", help="batch x seq_len settings")
    parser.add_argument("--worker", nargs=3, type=int, metavar=("RANK", "BATCH", "SEQ"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return

    from edge_client.models import default_model_dir
    from profiles.memory_model import ModelShape, predict_peak_memory, saved_activation_bytes

    shape = ModelShape.from_model_dir(default_model_dir())
    dense = 384 * NUM_LABELS + NUM_LABELS
    ranks = [int(r) for r in args.ranks.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = []
    print(f"{'rank':>4} {'batch':>5} {'seq':>4} {'predicted MB':>12} {'measured MB':>11} {'error %':>7}")
    for batch, seq_len in shapes:
        for rank in ranks:
            predicted = predict_peak_memory(shape, rank, batch, seq_len, dense_params=dense).total
            measured = measure(rank, batch, seq_len)
            rows.append((rank, batch, seq_len, measured))
            print(f"{rank:>4} {batch:>5} {seq_len:>4} {predicted / 1e6:>12.0f} {measured / 1e6:>11.0f} "
                  f"{100 * (predicted - measured) / measured:>+7.1f}", flush=True)
    # Calibration: measured - (weights + trainable state) = runtime + workspace * saved, least squares over all rows.
    import numpy as np

    fixed = [predict_peak_memory(shape, r, b, s, dense_params=dense, runtime_bytes=0, workspace_factor=0).total
             for r, b, s, _ in rows]
    saved = [saved_activation_bytes(shape, b, s, r, 6) for r, b, s, _ in rows]
    (runtime, factor), *_ = np.linalg.lstsq(np.column_stack([np.ones(len(rows)), saved]),
                                            np.array([m - f for (*_, m), f in zip(rows, fixed)]), rcond=None)
    print(f"\nleast-squares fit over these {len(rows)} rows: RUNTIME_BYTES = {runtime:.0f}, "
          f"WORKSPACE_FACTOR = {factor:.3f} (the model uses the values in profiles/memory_model.py)")

if __name__ == "__main__":
    main()
