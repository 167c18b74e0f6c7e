"""The transformers task model around a base model folder, and its tokenizer. Every load is `local_files_only`."""

from __future__ import annotations

import torch
import transformers

from hetlora.errors import UserError
from hetlora.models.folders import TASKS, check_model_dir
from hetlora.models.pooling import POOLINGS, MeanPoolingClassifier, declared_pooling


def default_pooling(model_dir, task: str) -> str | None:
    """The pooling a classification model uses unless told otherwise: what the checkpoint declares."""
    return declared_pooling(check_model_dir(model_dir)) if task == "classification" else None


def load_task_model(model_dir, task: str, num_labels: int | None = None, *, meta_device: bool = False,
                    pooling: str | None = None):
    """The transformers task model for `task` with pretrained base weights from `model_dir`.

    classification: a new head of `num_labels` over the base model, pooled per `pooling`
    (hetlora.models.pooling; default: what the checkpoint declares): `native` is
    AutoModelForSequenceClassification, `mean` a MeanPoolingClassifier over AutoModel.
    causal-lm: AutoModelForCausalLM. With `meta_device` only shapes are built (no weights).
    """
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


def load_tokenizer(model_dir):
    """The model folder's tokenizer (local files only), with a pad token (eos if it had none)."""
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a tokenizer from {model_dir}: {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
