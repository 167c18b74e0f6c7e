"""Where an ExecuTorch training step spends its time: ETDump per operator, summed by kind.

Loads one rank's program from an export folder with ExecuTorch's event tracer on, runs `--steps` training
steps (after one warm-up) on a synthetic full-length batch of the exported shape, and prints per operator
kind: milliseconds per step, share of the step, calls per step. XNNPACK's operators are prefixed "XNN";
the rest are ExecuTorch's own CPU kernels (one thread). The sum can exceed the step: a delegate call's
time contains its operators' times, so the two delegate lines are listed apart as overhead totals.

    .venv/bin/python benchmarks/profile_executorch.py ARTIFACTS [--rank 8] [--steps 3] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPANS = ("DELEGATE_CALL", "OPERATOR_CALL")  # one event around each delegate call / each CPU kernel call
SKIPPED = ("Method::execute", "Program::load_method", "Method::init")
NUMBERED = re.compile(r" #\d+$")  # XNNPACK numbers each operator instance


def step_inputs(artifact) -> list:
    """The bench's synthetic batch at the artifact's shape (every position attended, every next token a target or
    a class 0/1), all ranks kept, the last rank component as the tail, prune_lambda 0, lora_scale 2."""
    import torch

    from edge_client.bench.steppers import synthetic_batch

    # token ids below 30,000 exist in every vocabulary the exporter takes (BERT's 30,522, SmolLM2's 49,152)
    batch = synthetic_batch(artifact.batch, artifact.seq_len, 30_000, 2 if artifact.task == "classification" else None)
    tail = torch.zeros(artifact.rank)
    tail[-1] = 1.0
    return [*(torch.from_numpy(batch[k]) for k in ("input_ids", "attention_mask", "labels")), torch.ones(artifact.rank),
            tail, torch.tensor(0.0), torch.tensor(2.0)]


def profile(folder: str, rank: int, steps: int, threads: int) -> dict:
    """Run the program with ETDump on; returns step times and {kind: [total ms, calls]} over the timed steps."""
    import torch
    from executorch.extension.pybindings import _C

    sys.path.insert(0, str(ROOT))
    from edge_client.backends.artifacts import load_manifest

    torch.set_num_threads(threads)
    _C._unsafe_reset_threadpool(threads)
    artifact = load_manifest(folder).artifact("executorch", rank)
    weights = artifact.files.get("weights")
    module = _C._load_for_executorch(str(artifact.files["program"]), data_path=str(weights) if weights else None,
                                     enable_etdump=True)
    inputs = step_inputs(artifact)
    module.run_method("forward", inputs, clone_outputs=False)  # warm-up: XNNPACK's first-call setup
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        module.run_method("forward", inputs, clone_outputs=False)
        times.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "step.etdump"
        module.write_etdump_result_to_file(str(dump))
        kinds, runs = by_kind(dump)
    scale = 1.0 / runs  # every run's events are kept; average them (warm-up included)
    return {"rank": rank, "threads": threads, "steps": steps, "step_s": sorted(times)[len(times) // 2],
            "kinds": {k: {"ms_per_step": ms * scale, "calls_per_step": calls * scale}
                      for k, (ms, calls) in kinds.items()}}


def by_kind(dump: Path) -> tuple[dict[str, list[float]], int]:
    """{operator kind: [total ms, calls]} over every run in the dump, and the number of runs."""
    from executorch.devtools import Inspector

    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    runs = 0
    for block in Inspector(etdump_path=str(dump)).event_blocks:
        for event in block.events:
            if event.perf_data is None:
                continue
            if event.name == "Method::execute":
                runs = max(runs, len(event.perf_data.raw))
            if event.name in SKIPPED:
                continue
            kind = "XNN " + NUMBERED.sub("", event.name) if event.is_delegated_op else event.name
            kind = kind.removeprefix("native_call_")
            totals[kind][0] += sum(event.perf_data.raw)
            totals[kind][1] += len(event.perf_data.raw)
    return dict(totals), max(runs, 1)


def table(result: dict, top: int) -> str:
    step_ms = result["step_s"] * 1e3
    rows = sorted(result["kinds"].items(), key=lambda kv: -kv[1]["ms_per_step"])
    spans = [r for r in rows if r[0] in SPANS]
    ops = [r for r in rows if r[0] not in SPANS][:top]
    lines = [f"rank {result['rank']}, {result['threads']} threads, step {step_ms:.0f} ms (median of "
             f"{result['steps']}, event tracer on)", f"{'ms/step':>9} {'share':>6} {'calls':>7}  operator"]
    lines += [f"{v['ms_per_step']:9.1f} {v['ms_per_step'] / step_ms:6.1%} {v['calls_per_step']:7.0f}  {k}"
              for k, v in ops]
    lines += [f"{v['ms_per_step']:9.1f} {v['ms_per_step'] / step_ms:6.1%} {'':>7}  all {k.lower().replace('_', ' ')}s"
              for k, v in spans]
    return "\n".join(lines)


def profile_parser(description: str, runtime: str) -> argparse.ArgumentParser:
    """The options every artifact profile takes: ARTIFACTS [--rank] [--steps] [--threads] [--top] [--json]."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("artifacts", help=f"a `hetlora export` folder with {runtime} artifacts")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=25, help="rows to list")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def main(argv=None) -> int:
    args = profile_parser(__doc__.splitlines()[0], "ExecuTorch").parse_args(argv)
    result = profile(args.artifacts, args.rank, args.steps, args.threads)
    print(json.dumps(result, indent=1) if args.json else table(result, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
