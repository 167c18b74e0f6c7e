"""Save a wire adapter in Hugging Face PEFT's LoRA format (no peft import needed).

PEFT computes dW = (alpha / r) * B @ A. Writing r = lora_alpha = the adapter's rank makes the
scale exactly 1, so PEFT's B, A are the wire factors and dW = B_wire @ A_wire bit for bit.
Files: `adapter_config.json` and `adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight` (r x in), `...lora_B.weight` (out x r), and the dense
tensors (the classification head) as `base_model.model.<name>`, listed in `modules_to_save`.
Load with `peft.PeftModel.from_pretrained(base_task_model, out_dir)`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from hetlora.protocol.wire import Adapter
from hetlora.errors import UserError

PEFT_TASK_TYPES = {"classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}
PREFIX = "base_model.model."


def peft_config(adapter: Adapter, task: str, base_model: str | None = None) -> dict:
    """adapter_config.json for `adapter`: exact module names as target_modules, scale alpha / r = 1."""
    if task not in PEFT_TASK_TYPES:
        raise UserError(f"unknown task {task!r}; choose one of {', '.join(PEFT_TASK_TYPES)}")
    rank = adapter.rank
    if rank == 0:
        raise UserError("the adapter has no LoRA modules; nothing to export")
    return {
        "peft_type": "LORA",
        "task_type": PEFT_TASK_TYPES[task],
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "target_modules": sorted(adapter.lora),
        "modules_to_save": sorted({name.rpartition(".")[0] for name in adapter.dense}) or None,
    }


def peft_tensors(adapter: Adapter) -> dict[str, np.ndarray]:
    tensors = {}
    for name, (a, b) in adapter.lora.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a, dtype=np.float32)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b, dtype=np.float32)
    for name, t in adapter.dense.items():
        tensors[PREFIX + name] = np.ascontiguousarray(t, dtype=np.float32)
    return tensors


def save_peft(adapter: Adapter, out_dir: str | os.PathLike, task: str, base_model: str | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors into `out_dir` (created if needed)."""
    config = peft_config(adapter, task, base_model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(peft_tensors(adapter), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
