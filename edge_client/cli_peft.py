"""Convert adapters between the wire format and Hugging Face PEFT. `export` writes a folder that
AutoPeftModelForSequenceClassification / ForCausalLM.from_pretrained(folder) loads on its own; `import` reads a
PEFT LoRA adapter (any r and lora_alpha) into the wire format (`hetlora serve --init-adapter` also takes the
PEFT folder directly)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from hetlora.errors import UserError
from hetlora.labels import read_labels
from edge_client.model_check import check_adapter_base
from hetlora.models.bundled import default_model_dir
from hetlora.protocol.wire import decode, encode
from hetlora.protocol.atomic import write_bytes
from hetlora.protocol.peft_format import load_peft

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="peft_command", metavar="ACTION", required=True)
    exp = sub.add_parser("export", help="wire adapter -> PEFT folder", description="Write a PEFT LoRA folder (adapter, "
                         "tokenizer and, for classification, a base/ folder whose config records the labels).")
    exp.add_argument("--adapter", required=True, help="adapter in the wire format (.safetensors), e.g. a global")
    exp.add_argument("--out", required=True, help="output folder")
    exp.add_argument("--model", help="base model folder (default: the task's bundled model)")
    exp.add_argument("--task", choices=("classification", "causal-lm"), default="classification")
    exp.add_argument("--labels", help="the run's label list (JSON array or one per line), classification")
    exp.add_argument("--base-path", help="base_model_name_or_path to record, as the loader will see it "
                                         "(default: the absolute path of <out>/base for classification, of --model "
                                         "for causal-lm)")
    imp = sub.add_parser("import", help="PEFT folder -> wire adapter", description="Read a PEFT LoRA folder "
                         "(adapter_config.json + adapter_model.safetensors) and write it in the wire format, the "
                         "scale lora_alpha / r folded into lora_B.")
    imp.add_argument("--peft", required=True, help="PEFT adapter folder")
    imp.add_argument("--out", required=True, help="output file (.safetensors, wire format)")
    for q in (exp, imp):
        q.add_argument("--json", action="store_true", help="print what was written as JSON")


def run(args: argparse.Namespace) -> int:
    summary = export(args) if args.peft_command == "export" else import_(args)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"wrote {summary['out']}: rank {summary['rank']}, {summary['modules']} LoRA modules, "
              f"{summary['dense']} dense tensors")
    return 0


def export(args: argparse.Namespace) -> dict:
    # torch and transformers load when the command runs: its --help and argument errors stay instant
    from hetlora.models.peft_folder import export_peft
    from hetlora.models.task_model import default_pooling

    path = Path(args.adapter)
    if not path.is_file():
        raise UserError(f"adapter file {path} does not exist")
    adapter = decode(path.read_bytes())
    labels = read_labels(args.labels) if args.labels else adapter.meta.get("labels")
    model_dir = args.model or default_model_dir(args.task)
    if args.task != "classification" or labels:  # else export_peft asks for the labels
        check_adapter_base(adapter, model_dir, args.task, len(labels) if labels else None)
    out = export_peft(adapter, args.out, model_dir=model_dir, task=args.task, labels=labels, base_path=args.base_path)
    pooling = default_pooling(model_dir, args.task)
    if pooling not in (None, "native"):
        log.warning("this adapter was trained with %s pooling; AutoPeftModelForSequenceClassification builds the "
                    "model type's own pooling, so its logits differ: load it onto hetlora's model "
                    "(hetlora.models.task_model.load_task_model) with PeftModel.from_pretrained", pooling)
    return _summary(out, adapter)


def import_(args: argparse.Namespace) -> dict:
    adapter = load_peft(args.peft)
    write_bytes(Path(args.out), encode(adapter))
    return _summary(Path(args.out), adapter) | {"peft_r": adapter.meta["peft_r"],
                                                 "peft_lora_alpha": adapter.meta["peft_lora_alpha"]}


def _summary(out: Path, adapter) -> dict:
    return {"out": str(out), "rank": adapter.rank, "modules": len(adapter.lora), "dense": len(adapter.dense)}
