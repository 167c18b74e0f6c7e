"""The module that every artifact exports: one training step's loss as a pure function of its inputs.

    forward(input_ids, attention_mask, labels, keep_mask, tail_mask, prune_lambda, lora_scale)
        -> (loss, task_loss, tail, n_targets)
    loss = task_loss + prune_lambda * sum_layers ||B (.) tail||_F ||A (.) tail||_F
task_loss is edge_client.objective.batch_loss (mean over the n_targets labels that are not -100),
the same function the torch backend trains with.

`keep_mask` (r,) silences pruned rank components, `tail_mask` (r,) marks the HetLoRA tail and
`lora_scale` is s in y = W0 x + s B (m (.) A x); all three are runtime inputs, so one artifact per
rank tier serves every smaller effective rank (after self-pruning) without re-exporting.
Dropout is off (p = 0) so the graph is deterministic and equals the torch backend's step.
"""

from __future__ import annotations

import torch
from torch import nn

from edge_client.lora import inject_lora, lora_layers
from hetlora.models.task_model import dense_parameter_names, load_task_model
from edge_client.objective import model_loss_sum_and_count

INPUT_NAMES = ("input_ids", "attention_mask", "labels", "keep_mask", "tail_mask", "prune_lambda", "lora_scale")
OUTPUT_NAMES = ("loss", "task_loss", "tail", "n_targets")
MODEL_PREFIX = "model."


def safe_norm(x: torch.Tensor) -> torch.Tensor:
    """||x||_F with gradient 0 (not NaN) at x = 0, in plain ops every exporter handles.

    The inner `where` keeps sqrt away from 0 so its backward stays finite; the outer one
    restores the exact value 0.
    """
    sq = (x * x).sum()
    positive = sq > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, sq, torch.ones_like(sq))), torch.zeros_like(sq))


class TrainingGraph(nn.Module):
    """A task model with LoRA layers; forward returns (loss, task_loss, tail, n_targets), loss first."""

    def __init__(self, model: nn.Module, task: str):
        super().__init__()
        self.model = model
        self.task = task
        self.layers = list(lora_layers(model).values())

    def forward(self, input_ids, attention_mask, labels, keep_mask, tail_mask, prune_lambda, lora_scale):
        for layer in self.layers:
            layer.keep_mask = keep_mask
            layer.scale = lora_scale
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        total, count = model_loss_sum_and_count(self.model, batch, self.task, static_shapes=True)
        task_loss = total / count.clamp(min=1)
        tail = torch.stack([safe_norm(layer.lora_B * tail_mask) * safe_norm(layer.lora_A * tail_mask[:, None])
                            for layer in self.layers]).sum()
        # Only output 0 may carry gradient in a joint forward-backward graph.
        return task_loss + prune_lambda * tail, task_loss.detach(), tail.detach(), count.detach()


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0 (modules and the attention-dropout config fields)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    for key in ("attention_dropout", "attention_probs_dropout_prob", "hidden_dropout_prob", "classifier_dropout"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)


def build_training_graph(model_dir, task: str, rank: int, targets, lora_alpha: float,
                         num_labels: int | None = None) -> TrainingGraph:
    """Pretrained base model + zero LoRA factors of `rank` + (classification) its head, dropout off.

    Trainable parameters: every lora_A / lora_B and the dense head; everything else frozen.
    """
    torch.manual_seed(0)  # the fresh head equals the torch backend's (TorchTrainer seeds 0 too)
    model = load_task_model(model_dir, task, num_labels)
    model.set_attn_implementation("eager")  # SDPA's fused backward is not a core ATen / ONNX op
    dense = set(dense_parameter_names(model, task))
    inject_lora(model, tuple(targets), rank, lora_alpha)
    for name, p in model.named_parameters():
        if name in dense:
            p.requires_grad_(True)
    disable_dropout(model)
    if getattr(model.config, "use_cache", False):
        model.config.use_cache = False  # one training step: no key/value cache to build or return
    model.eval()
    return TrainingGraph(model, task)


def trainable_names(graph: TrainingGraph) -> list[str]:
    """Parameter names (as the exported graph sees them) that receive gradients."""
    return [n for n, p in graph.named_parameters() if p.requires_grad]


def frozen_names(graph: TrainingGraph) -> list[str]:
    return [n for n, p in graph.named_parameters() if not p.requires_grad]


def example_inputs(task: str, rank: int, batch: int, seq_len: int, vocab_size: int) -> tuple[torch.Tensor, ...]:
    """Inputs of the exported shapes (values only matter for tracing)."""
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (batch, seq_len), generator=g)
    attention_mask = torch.ones(batch, seq_len, dtype=torch.long)
    labels = torch.zeros(batch, dtype=torch.long) if task == "classification" else input_ids.clone()
    keep = torch.ones(rank)
    tail = torch.zeros(rank)
    tail[-1] = 1.0
    return input_ids, attention_mask, labels, keep, tail, torch.tensor(0.0), torch.tensor(1.0)
