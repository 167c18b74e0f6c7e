"""The local training objective, shared by every training backend (the pruning rule: hetlora.protocol.lora_rules).

Batch labels use -100 for "no target" (prompt tokens, padding, filler rows of a last partial
batch). Causal-LM labels are aligned with `input_ids` (not shifted); the loss shifts them, as
transformers does: the logits at position t predict the label at t + 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

IGNORE = -100


def batch_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not IGNORE.

    classification: logits (B, C), labels (B,).
    causal-lm: logits (B, T, V), labels (B, T); loss = mean over t of -log p(labels[:, t+1] | logits[:, t]).
    A batch without any target has loss 0.
    """
    total, count = loss_sum_and_count(logits, labels, task)
    return total / count.clamp(min=1)


def loss_sum_and_count(logits: torch.Tensor, labels: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over the non-IGNORE targets and their number (for exact means over many batches)."""
    from torch.nn import functional as F  # torch stays out of imports of IGNORE

    if task == "causal-lm":
        logits, labels = logits[:, :-1, :], labels[:, 1:]
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1)
    total = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE, reduction="sum")
    return total, (flat_labels != IGNORE).sum()


def model_loss_sum_and_count(model, batch: dict, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`loss_sum_and_count` of the model's forward pass on `batch`. For a causal LM the output head (for
    SmolLM2 a 576 x 49,152 matmul, a fifth of the model's work) runs only at the positions that predict
    a target: the same value, far fewer FLOPs and no (B, T, V) logits tensor."""
    from torch.nn import functional as F

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if task != "causal-lm" or getattr(model.config, "final_logit_softcapping", None):
        return loss_sum_and_count(model(**inputs).logits, batch["labels"], task)
    hidden = getattr(model, model.base_model_prefix)(**inputs).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), keep.sum()
