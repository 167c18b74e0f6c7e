"""A local base model folder: its check, its model type, its default LoRA targets (and which module names match a
target), its content hash."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

from hetlora.errors import UserError

TASKS = ("classification", "causal-lm")

# Attention query/key/value/output and the feed-forward projections, by model type.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
}


def check_model_dir(model_dir: str | os.PathLike) -> Path:
    """`model_dir` as a Path; a UserError unless it holds a config.json."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a model folder (no config.json); pass a local Hugging Face model folder")
    return path


def model_type(model_dir: str | os.PathLike) -> str:
    return json.loads((check_model_dir(model_dir) / "config.json").read_text()).get("model_type", "")


def default_targets(model_dir: str | os.PathLike) -> tuple[str, ...]:
    mtype = model_type(model_dir)
    if mtype not in DEFAULT_TARGETS:
        raise UserError(f"no default LoRA targets for model type {mtype!r}; pass --targets name,name,...")
    return DEFAULT_TARGETS[mtype]


def matches_target(module_name: str, targets: tuple[str, ...] | list[str]) -> bool:
    """A module is targeted when its name equals a target or ends with '.' + target."""
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


@functools.lru_cache(maxsize=8)
def _fingerprint(path: str, stamp: tuple) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(path).iterdir()):
        if f.name == "config.json" or f.suffix == ".safetensors":
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def model_hash(model_dir: str | os.PathLike) -> str:
    """sha256 over config.json and the safetensors weight files of the base model."""
    path = check_model_dir(model_dir).resolve()
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.iterdir()) if f.is_file())
    return _fingerprint(str(path), stamp)
