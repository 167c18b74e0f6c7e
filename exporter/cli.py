"""Export trainable on-device artifacts (ExecuTorch .pte, ONNX Runtime training) per LoRA rank tier.

Copy the --out folder to the devices and run `hetlora client --backend onnx|executorch --artifacts DIR`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from exporter import EXECUTORCH_DELEGATES
from hetlora.argtypes import add_renamed
from hetlora.labels import read_labels
from hetlora.models.bundled import default_model_dir
from hetlora.models.folders import check_model_dir
from hetlora.output import show_progress


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _ranks(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ranks takes integers like 4,8,16, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="base model folder (default: the task's bundled model)")
    p.add_argument("--task", required=True, choices=("classification", "causal-lm"))
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--labels", help="label list file (JSON array or one per line), classification")
    labels.add_argument("--num-labels", type=int, help="number of classes, classification")
    p.add_argument("--ranks", type=_ranks, default=(4, 8, 16, 32, 64), help="rank tiers (default 4,8,16,32,64)")
    add_renamed(p, "--batch-size", "--batch", type=int, default=16, help="fixed batch size of the artifacts (default 16)")
    p.add_argument("--seq-len", type=int, default=64, help="fixed sequence length (default 64)")
    p.add_argument("--backends", type=_csv, default=("executorch", "onnx"), help="executorch,onnx (default both)")
    p.add_argument("--targets", type=_csv, help="LoRA target module names (default: the model type's defaults)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha of the run (default 16)")
    p.add_argument("--executorch-delegate", choices=EXECUTORCH_DELEGATES, default=EXECUTORCH_DELEGATES[0],
                   help="xnnpack (default): matmuls and attention ops on XNNPACK; portable: "
                        "ExecuTorch's CPU kernels only (see docs/EXPORT.md)")
    p.add_argument("--out", required=True, help="output folder (manifest.json + artifacts)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    # torch and transformers load when the command runs: its --help and argument errors stay instant
    from exporter.export import ExportRequest, export_all

    model_dir = check_model_dir(args.model) if args.model else default_model_dir(args.task)
    req = ExportRequest(model_dir=Path(model_dir), task=args.task, ranks=args.ranks, batch=args.batch_size,
                        seq_len=args.seq_len, backends=args.backends, out=Path(args.out), targets=args.targets,
                        labels=tuple(read_labels(args.labels)) if args.labels else None, num_labels=args.num_labels,
                        lora_alpha=args.lora_alpha,
                        executorch_delegate=args.executorch_delegate)
    doc = export_all(req, progress=not args.no_progress and show_progress())
    files = {f["path"]: f["bytes"] for a in doc["artifacts"] for f in a["files"].values()}  # shared files once
    total = sum(files.values())
    print(f"wrote {len(doc['artifacts'])} artifacts ({total / 1e6:.1f} MB) and manifest.json to {args.out}")
    return 0
