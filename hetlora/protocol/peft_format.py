"""Hugging Face PEFT's LoRA format to and from the wire format (no peft import needed).

PEFT computes dW = s * B @ A with s = lora_alpha / r (lora_alpha / sqrt(r) with `use_rslora`).
Saving writes r = lora_alpha = the adapter's rank, so s = 1 and PEFT's B, A are the wire factors:
dW = B_wire @ A_wire bit for bit. Loading folds any s into B: B_wire = s * B_peft, A_wire = A_peft,
so the imported adapter computes what PEFT computes, whatever alpha / r is.
Files: `adapter_config.json` and `adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight` (r x in), `...lora_B.weight` (out x r), and the dense
tensors (the classification head) as `base_model.model.<name>`, listed in `modules_to_save`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from hetlora.protocol.wire import Adapter
from hetlora.errors import UserError

PEFT_TASK_TYPES = {"classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}
PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
FACTOR_SUFFIXES = {".lora_A.weight": 0, ".lora_B.weight": 1}


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
    save_file(peft_tensors(adapter), str(out / WEIGHTS), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def peft_scale(config: dict) -> float:
    """s of dW = s * B @ A for a LoRA adapter_config.json; UserError for variants the wire format cannot hold."""
    if config.get("peft_type") != "LORA":
        raise UserError(f"only LoRA adapters can be imported, this one is {config.get('peft_type')!r}")
    unsupported = [key for key in ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern") if config.get(key)]
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']!r}")
    if unsupported:
        raise UserError(f"the adapter uses {', '.join(unsupported)}; only plain LoRA (one r and lora_alpha for every "
                        "module, no bias, no DoRA) can be imported")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise UserError(f"adapter_config.json needs a positive integer r and a number lora_alpha, got r={r!r}, "
                        f"lora_alpha={alpha!r}")
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)


def load_peft(folder: str | os.PathLike) -> Adapter:
    """A PEFT LoRA adapter folder as a wire adapter (scale folded into B); UserError when it is not one."""
    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG).read_text())
        tensors = load_file(str(folder / WEIGHTS))
    except FileNotFoundError as exc:
        raise UserError(f"{folder} is not a PEFT adapter folder: {Path(exc.filename).name} is missing (only "
                        f"safetensors weights are read)") from None
    except (json.JSONDecodeError, SafetensorError, OSError) as exc:
        raise UserError(f"cannot read the PEFT adapter in {folder}: {exc}") from None
    scale = np.float32(peft_scale(config))
    factors: dict[str, list] = {}
    dense = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise UserError(f"{folder / WEIGHTS}: unexpected tensor {key!r} (PEFT keys start with {PREFIX!r})")
        name = key[len(PREFIX):]
        suffix = next((s for s in FACTOR_SUFFIXES if name.endswith(s)), None)
        if suffix is not None:
            factors.setdefault(name[: -len(suffix)], [None, None])[FACTOR_SUFFIXES[suffix]] = value.astype(np.float32)
        elif "lora_" in name:
            raise UserError(f"{folder / WEIGHTS}: unsupported LoRA tensor {key!r} (only linear-layer LoRA is imported)")
        else:
            dense[name] = value.astype(np.float32)
    incomplete = sorted(n for n, (a, b) in factors.items() if a is None or b is None)
    if incomplete or not factors:
        raise UserError(f"{folder / WEIGHTS}: " + (f"module {incomplete[0]!r} lacks lora_A or lora_B" if incomplete
                                                  else "no LoRA factors"))
    lora = {n: (a, np.ascontiguousarray(b * scale)) for n, (a, b) in factors.items()}
    return Adapter(lora=lora, dense=dense, meta={"imported_from": "peft", "peft_r": config["r"],
                                                 "peft_lora_alpha": config["lora_alpha"]})
