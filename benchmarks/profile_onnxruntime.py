"""Where an ONNX Runtime training step spends its time: ORT's profiler, summed per operator kind.

Opens one rank's training session from an export folder as the client does (OnnxEngine: same threads, same
memory arena), with ORT's profiler on, runs one warm-up step and `--steps` timed steps on the bench's synthetic
full-length batch, and prints per operator kind (ORT's fused kinds, e.g. FusedMatMul, GeluGrad) or with
`--by-node` per graph node (layer numbers folded, its first two input shapes shown): milliseconds per step, share of the
step, calls per step. The warm-up's events are left out. Also reported: minor page faults per timed step, which
count the memory a step takes from the system afresh (a step that keeps its memory has none).

    .venv/bin/python benchmarks/profile_onnxruntime.py ARTIFACTS [--rank 8] [--steps 3] [--threads 2] [--by-node]
                                                        [--top N] [--json]
"""

from __future__ import annotations

import collections
import gc
import json
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYER_NUMBER = re.compile(r"layers?\.\d+")


def profile(folder: str, rank: int, steps: int, threads: int, by_node: bool = False) -> dict:
    """Run the training step with ORT's profiler on; returns step times, faults per step and, per operator kind
    (or node), {"ms_per_step", "calls_per_step", "shapes"} over the timed steps."""
    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks.profile_executorch import step_inputs
    from edge_client.backends.artifacts import load_manifest
    from edge_client.backends.onnx_backend import OnnxEngine

    torch.set_num_threads(threads)
    artifact = load_manifest(folder).artifact("onnx", rank)
    inputs = [x.numpy() for x in step_inputs(artifact)]
    with tempfile.TemporaryDirectory() as tmp:
        engine = OnnxEngine(artifact, profile_prefix=str(Path(tmp) / "ort"))
        engine.forward_backward(inputs)  # warm-up: first-run allocations
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            engine.forward_backward(inputs)
            times.append(time.perf_counter() - start)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        engine.close()  # each session (training, evaluation) writes its own profile when it is destroyed
        gc.collect()
        events = [e for path in Path(tmp).glob("ort*.json") for e in json.loads(path.read_text())]
    totals = by_kind(events, by_node)
    return {"rank": rank, "threads": threads, "steps": steps, "step_s": sorted(times)[len(times) // 2],
            "page_faults_per_step": faults / steps,
            "kinds": {k: {"ms_per_step": v["us"] / 1e3 / steps, "calls_per_step": v["calls"] / steps,
                          "shapes": v["shapes"]} for k, v in totals.items()}}


def by_kind(events: list[dict], by_node: bool) -> dict[str, dict]:
    """{kind or node: {"us", "calls", "shapes"}} over every run but the first (the warm-up)."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    if not runs:
        raise SystemExit("the profile holds no model_run events: nothing was run")
    after_warmup = runs[0][1]
    totals: dict[str, dict] = collections.defaultdict(lambda: {"us": 0, "calls": 0, "shapes": None})
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < after_warmup:
            continue
        kind = LAYER_NUMBER.sub("layers.N", e["name"].removesuffix("_kernel_time")) if by_node \
            else e["args"]["op_name"]
        entry = totals[kind]
        entry["us"] += e["dur"]
        entry["calls"] += 1
        if by_node and entry["shapes"] is None:
            entry["shapes"] = [list(t.values())[0] for t in e["args"].get("input_type_shape", [])][:2]
    return dict(totals)


def table(result: dict, top: int) -> str:
    step_ms = result["step_s"] * 1e3
    rows = sorted(result["kinds"].items(), key=lambda kv: -kv[1]["ms_per_step"])
    nodes_ms = sum(v["ms_per_step"] for _, v in rows)
    lines = [f"rank {result['rank']}, {result['threads']} threads, step {step_ms:.0f} ms (median of "
             f"{result['steps']}, profiler on), kernels {nodes_ms:.0f} ms, "
             f"{result['page_faults_per_step']:.0f} page faults a step",
             f"{'ms/step':>9} {'share':>6} {'calls':>7}  operator"]
    lines += [f"{v['ms_per_step']:9.1f} {v['ms_per_step'] / step_ms:6.1%} {v['calls_per_step']:7.0f}  {k}"
              + (f"  {v['shapes']}" if v["shapes"] else "") for k, v in rows[:top]]
    return "\n".join(lines)


def main(argv=None) -> int:
    sys.path.insert(0, str(ROOT))
    from benchmarks.profile_executorch import profile_parser

    parser = profile_parser(__doc__.splitlines()[0], "ONNX Runtime")
    parser.add_argument("--by-node", action="store_true", help="per graph node (layers folded), not per kind")
    args = parser.parse_args(argv)
    result = profile(args.artifacts, args.rank, args.steps, args.threads, args.by_node)
    print(json.dumps(result, indent=1) if args.json else table(result, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
