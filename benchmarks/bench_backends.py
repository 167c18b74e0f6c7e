"""Training backends on MiniLM: step time (and ratio to torch eager), peak memory, export time, artifact sizes.

    .venv/bin/python benchmarks/bench_backends.py [--ranks 4,8,16,32,64] [--batch 16] [--seq-len 64]
        [--steps 5] [--rounds 3] [--backends torch,onnx,executorch] [--delegate xnnpack|portable] [--out DIR]

Exports the artifacts (timed) unless --out already holds them, then measures each (backend, rank)
in its own subprocess so peak RSS is that backend's alone. Steps: forward + backward + optimizer
update on one fixed batch (SGD for executorch, AdamW for torch and onnx), median of --steps after one
warm-up step; --rounds rounds per rank, all backends back to back in each (see measure_rank).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
NUM_LABELS = 77  # banking77


def worker(backend: str, rank: int, out: Path, steps: int) -> dict:
    """Time `steps` training steps of one backend at one rank; runs in a fresh process."""
    import numpy as np

    from edge_client.backends.artifacts import load_manifest
    from edge_client.lora import lora_scale
    from edge_client.models import default_model_dir
    from hetlora.protocol.settings import TrainingSettings

    manifest = load_manifest(out)
    b, t = manifest.batch, manifest.seq_len
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, (b, t)).astype(np.int64)
    ids[:, 0] = 101
    inputs = [ids, np.ones((b, t), np.int64), rng.integers(0, NUM_LABELS, b).astype(np.int64),
              np.ones(rank, np.float32), np.zeros(rank, np.float32), np.array(0.0, np.float32),
              np.array(lora_scale(manifest.doc["lora_alpha"], rank), np.float32)]
    cfg = TrainingSettings(lr=1e-4, optimizer="sgd" if backend == "executorch" else "adamw")
    if backend == "torch":
        import torch

        from exporter.training_graph import build_training_graph

        torch.manual_seed(0)
        graph = build_training_graph(default_model_dir(), "classification", rank, tuple(manifest.doc["targets"]),
                                     manifest.doc["lora_alpha"], NUM_LABELS)
        params = [p for p in graph.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr)
        tensors = [torch.from_numpy(x) for x in inputs]

        def step():
            opt.zero_grad(set_to_none=True)
            graph(*tensors)[0].backward()
            opt.step()
    else:
        if backend == "onnx":
            from edge_client.backends.onnx_backend import OnnxEngine as Engine
        else:
            from edge_client.backends.executorch_backend import ExecuTorchEngine as Engine
        artifact = manifest.artifact(backend, rank)
        manifest.verify(artifact)
        engine = Engine(artifact)

        def step():
            engine.forward_backward(inputs)
            engine.step(cfg)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times[1:]), "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """VmHWM of this process (ru_maxrss would carry the parent's peak across exec on Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_worker(backend: str, rank: int, args) -> dict | None:
    """One worker subprocess: {"step_s", "peak_rss_mb"}, or None (reported) if it failed."""
    proc = subprocess.run([sys.executable, __file__, "--worker", backend, str(rank), "--out", str(args.out),
                           "--steps", str(args.steps)], capture_output=True, text=True)
    if proc.returncode:
        print(f"{backend} r{rank} failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_rank(rank: int, args, doc: dict) -> list[tuple]:
    """Table rows of one rank: --rounds rounds, each running every backend back to back.

    "x torch" is the median over rounds of step / torch's step in the same round, so the drift of a
    shared machine between rounds cancels out of the ratio.
    """
    rounds = []
    for _ in range(args.rounds):
        results = {backend: run_worker(backend, rank, args) for backend in args.backends}
        rounds.append({backend: res for backend, res in results.items() if res})
    rows = []
    for backend in args.backends:
        results = [r[backend] for r in rounds if backend in r]
        if not results:
            continue
        ratios = [r[backend]["step_s"] / r["torch"]["step_s"] for r in rounds if backend in r and "torch" in r]
        entry = next((a for a in doc["artifacts"] if a["backend"] == backend and a["rank"] == rank), None)
        rows.append((rank, backend, statistics.median(r["step_s"] for r in results),
                     statistics.median(ratios) if ratios else float("nan"), max(r["peak_rss_mb"] for r in results),
                     entry["export_seconds"] if entry else 0.0, *artifact_megabytes(doc, entry)))
    return rows


def artifact_megabytes(doc: dict, entry: dict | None) -> tuple[float, float]:
    """(MB of the files only this artifact uses, MB of the files it shares with other ranks)."""
    if entry is None:
        return 0.0, 0.0
    uses = Counter(f["path"] for a in doc["artifacts"] for f in a["files"].values())
    own = sum(f["bytes"] for f in entry["files"].values() if uses[f["path"]] == 1)
    shared = sum(f["bytes"] for f in entry["files"].values() if uses[f["path"]] > 1)
    return own / 1e6, shared / 1e6


def export(args, out: Path) -> None:
    from edge_client.models import default_model_dir
    from exporter.export import ExportRequest, export_all

    export_all(ExportRequest(model_dir=default_model_dir(), task="classification", ranks=args.ranks, batch=args.batch,
                             seq_len=args.seq_len, backends=tuple(b for b in args.backends if b != "torch"), out=out,
                             num_labels=NUM_LABELS, executorch_delegate=args.delegate))


def main() -> None:
    from exporter import EXECUTORCH_DELEGATES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=lambda s: tuple(int(x) for x in s.split(",")), default=(4, 8, 16, 32, 64))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3, help="worker runs per (backend, rank), interleaved")
    p.add_argument("--backends", type=lambda s: tuple(s.split(",")), default=("torch", "onnx", "executorch"))
    p.add_argument("--delegate", default=EXECUTORCH_DELEGATES[0], choices=EXECUTORCH_DELEGATES)
    p.add_argument("--out", type=Path, default=Path("/tmp/hetlora-bench-artifacts"))
    p.add_argument("--worker", nargs=2, metavar=("BACKEND", "RANK"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.out, args.steps)))
        return
    if not (args.out / "manifest.json").is_file():
        export(args, args.out)
    doc = json.loads((args.out / "manifest.json").read_text())
    rows = [row for rank in args.ranks for row in measure_rank(rank, args, doc)]
    delegates = {a["optimizer"].get("delegate") for a in doc["artifacts"] if a["backend"] == "executorch"}
    print(f"MiniLM-L6, batch {doc['batch']}, seq {doc['seq_len']}, targets {','.join(doc['targets'])}, "
          f"executorch delegate {','.join(sorted(d for d in delegates if d)) or '-'}, {args.rounds} rounds")
    print(f"{'rank':>4}  {'backend':<10}  {'step s':>7}  {'x torch':>7}  {'peak MB':>7}  {'export s':>8}  "
          f"{'own MB':>7}  {'shared MB':>9}")
    for rank, backend, step, ratio, rss, exp_s, own, shared in rows:
        print(f"{rank:>4}  {backend:<10}  {step:7.3f}  {ratio:7.2f}  {rss:7.0f}  {exp_s:8.1f}  {own:7.1f}  {shared:9.1f}")
    print("own MB: files of this rank alone; shared MB: files every rank of the export uses (stored once)")


if __name__ == "__main__":
    main()
