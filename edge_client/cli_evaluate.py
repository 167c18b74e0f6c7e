"""Evaluate a global adapter on a test file: accuracy and macro-F1 (classification) or perplexity (causal-lm)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edge_client.data import load_examples
from hetlora.labels import read_labels
from edge_client.model_check import check_adapter_base, check_head
from hetlora.models.bundled import default_model_dir
from hetlora.protocol.wire import decode
from hetlora.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="base model folder (default: the task's bundled model)")
    parser.add_argument("--task", choices=("classification", "causal-lm"), default="classification")
    parser.add_argument("--adapter", required=True, help="adapter file in the wire format (.safetensors)")
    parser.add_argument("--test", required=True, help="test file (CSV or JSONL)")
    parser.add_argument("--labels", help="label list (JSON array or one per line); default: the adapter's "
                        "metadata 'labels'")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", help="default: 'label', else 'category'")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")


def run(args: argparse.Namespace) -> int:
    # torch and transformers load when the command runs: its --help and argument errors stay instant
    from edge_client.evaluate import Evaluator

    path = Path(args.adapter)
    if not path.is_file():
        raise UserError(f"adapter file {path} does not exist")
    adapter = decode(path.read_bytes())
    labels = None
    if args.task == "classification":
        labels = read_labels(args.labels) if args.labels else adapter.meta.get("labels")
        if not labels:
            raise UserError("the adapter carries no label list; pass --labels FILE (e.g. hetlora/data/banking77/categories.json)")
    examples = load_examples(args.test, args.task, labels, text_column=args.text_column,
                             label_column=args.label_column)
    model_dir = args.model or default_model_dir(args.task)
    check_head(model_dir, args.task, len(labels) if labels else None)
    check_adapter_base(adapter, model_dir, args.task, len(labels) if labels else None)
    evaluator = Evaluator(model_dir, args.task, labels)
    metrics = evaluator.evaluate(adapter, examples, seq_len=args.seq_len, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(metrics, indent=2))
    elif args.task == "classification":
        print(f"{metrics['n']} examples: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}, "
              f"loss {metrics['loss']:.4f}")
    else:
        print(f"{metrics['n']} examples, {metrics['tokens']} target tokens: perplexity {metrics['perplexity']:.3f}")
    return 0
