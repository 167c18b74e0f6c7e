"""Base models from a local folder, the task model around them, and the AdapterSpec they imply.

Nothing is downloaded: every load is `local_files_only`. The default models (edge_client.model_store):
all-MiniLM-L6-v2 for classification, SmolLM2-135M-Instruct for causal-lm.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from edge_client.lora import matches_target  # noqa: E402
from hetlora.protocol.spec import AdapterSpec, LoRAModule  # noqa: E402
from hetlora.errors import UserError  # noqa: E402

TASKS = ("classification", "causal-lm")

# Attention query/key/value/output and the feed-forward projections, by model type.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
}


def default_model_dir(task: str = "classification") -> Path:
    """The installed folder of the task's default model (edge_client.model_store)."""
    from edge_client.model_store import default_model_dir as find

    return find(task)


def check_model_dir(model_dir: str | os.PathLike) -> Path:
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


def default_pooling(model_dir, task: str) -> str | None:
    """The pooling a classification model uses unless told otherwise: what the checkpoint declares."""
    from edge_client.pooling import declared_pooling

    return declared_pooling(check_model_dir(model_dir)) if task == "classification" else None


def load_task_model(model_dir, task: str, num_labels: int | None = None, *, meta_device: bool = False,
                    pooling: str | None = None):
    """The transformers task model for `task` with pretrained base weights from `model_dir`.

    classification: a new head of `num_labels` over the base model, pooled per `pooling`
    (edge_client.pooling; default: what the checkpoint declares): `native` is
    AutoModelForSequenceClassification, `mean` a MeanPoolingClassifier over AutoModel.
    causal-lm: AutoModelForCausalLM. With `meta_device` only shapes are built (no weights).
    """
    import torch
    import transformers

    from edge_client.pooling import POOLINGS, MeanPoolingClassifier

    path = check_model_dir(model_dir)
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task == "classification" and not num_labels:
        raise UserError("classification needs the number of labels")
    pooling = pooling or default_pooling(path, task)
    if task == "classification" and pooling not in POOLINGS:
        raise UserError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if pooling == "mean":
        cls, kwargs = transformers.AutoModel, {}
    elif task == "classification":
        cls, kwargs = transformers.AutoModelForSequenceClassification, {"num_labels": num_labels}
    else:
        cls, kwargs = transformers.AutoModelForCausalLM, {}
    if meta_device:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, **kwargs)
        with torch.device("meta"):
            model = cls.from_config(config)
    else:
        try:
            model = cls.from_pretrained(path, local_files_only=True, **kwargs)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load a {task} model from {path}: {exc}") from None
    if pooling == "mean":
        with torch.device("meta" if meta_device else "cpu"):
            model = MeanPoolingClassifier(model, num_labels)
    elif task == "classification" and model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def dense_parameter_names(model, task: str) -> list[str]:
    """Trainable non-LoRA tensors: for classification, the new head (everything outside the base model)."""
    if task != "classification":
        return []
    prefix = model.base_model_prefix + "."
    return [n for n, _ in model.named_parameters() if not n.startswith(prefix)]


def derive_spec(model_dir, task: str, targets=None, num_labels: int | None = None,
                pooling: str | None = None) -> AdapterSpec:
    """The AdapterSpec for (model, task, targets, pooling), built on the meta device (no weights loaded)."""
    from torch import nn

    targets = tuple(targets or default_targets(model_dir))
    pooling = pooling or default_pooling(model_dir, task)
    model = load_task_model(model_dir, task, num_labels, meta_device=True, pooling=pooling)
    modules = {
        name: LoRAModule(name, m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and matches_target(name, targets)
    }
    if not modules:
        raise UserError(f"no linear layer of {model_dir} matches the LoRA targets {list(targets)}")
    params = dict(model.named_parameters())
    dense = {n: tuple(params[n].shape) for n in dense_parameter_names(model, task)}
    return AdapterSpec(model_hash=model_hash(model_dir), task=task, targets=targets, modules=modules, dense=dense,
                       pooling=pooling)
