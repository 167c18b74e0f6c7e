"""Checks of a local model folder against a run, before transformers loads it (its errors are tracebacks)."""

from __future__ import annotations

import json
from pathlib import Path

from hetlora.errors import UserError
from hetlora.protocol.wire import WireFormatError, validate


def head_labels(model_dir) -> int | None:
    """The label count of the classification head saved in `model_dir` (None: a base model, or no readable config)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or not any(str(a).endswith("ForSequenceClassification")
                                               for a in config.get("architectures") or []):
        return None
    return len(config.get("id2label") or {}) or config.get("num_labels")


def check_head(model_dir, task: str, num_labels: int | None) -> None:
    """UserError when `model_dir` holds a classification head for another number of labels than `num_labels`.

    A base model folder (no `*ForSequenceClassification` architecture) gets a new head and always fits; a folder
    without a readable config is left to the model loader to explain."""
    if task != "classification" or not num_labels:
        return
    head = head_labels(model_dir)
    if head and head != num_labels:
        raise UserError(f"the model folder {model_dir} has a classification head for {head} labels, but this run "
                        f"has {num_labels} labels; use the base model folder (without a head) or one trained for "
                        "these labels")


def check_adapter_base(adapter, model_dir, task: str, num_labels: int | None = None) -> None:
    """UserError when `adapter` does not belong to the base model in `model_dir`: its modules or shapes do not
    fit the model, or (for a global, which records its run's `spec_fingerprint`, over the model's default LoRA
    targets) the fingerprint differs, as it does for another model of the same shapes."""
    # the model stack only here: the other checks run before transformers is imported
    from hetlora.models.adapter_spec import derive_spec

    spec = derive_spec(model_dir, task, num_labels=num_labels)
    advice = "pass --model with the folder of the base model the adapter was trained on"
    try:
        validate(adapter, spec, max_rank=max(adapter.rank, 1), require_all_modules=False)  # rank: mixed ranks raise
    except WireFormatError as exc:
        raise UserError(f"the adapter does not fit the base model {model_dir} ({exc}); {advice}") from None
    recorded = adapter.meta.get("spec_fingerprint")
    if recorded and set(spec.modules) == set(adapter.lora) and spec.fingerprint != recorded:
        raise UserError(f"the adapter was trained on another base model than {model_dir} (spec {recorded}, this "
                        f"model gives {spec.fingerprint}); {advice}")
