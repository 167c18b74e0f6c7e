"""The AdapterSpec a (model, task, targets, pooling) implies, derived on the meta device (no weights loaded)."""

from __future__ import annotations

from torch import nn

from hetlora.errors import UserError
from hetlora.models.folders import default_targets, matches_target, model_hash
from hetlora.models.task_model import default_pooling, dense_parameter_names, load_task_model
from hetlora.protocol.spec import AdapterSpec, LoRAModule


def derive_spec(model_dir, task: str, targets=None, num_labels: int | None = None,
                pooling: str | None = None) -> AdapterSpec:
    """The AdapterSpec for (model, task, targets, pooling): the targeted linear layers and the dense head's shapes."""
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
