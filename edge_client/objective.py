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
    if task == "causal-lm":
        logits, labels = logits[:, :-1, :], labels[:, 1:]
    return target_loss_sum_and_count(logits, labels)


def target_loss_sum_and_count(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of logits (..., C) against targets (...) over the non-IGNORE targets, and their number."""
    from torch.nn import functional as F  # torch stays out of imports of IGNORE

    flat_targets = targets.reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat_targets, ignore_index=IGNORE,
                            reduction="sum")
    return total, (flat_targets != IGNORE).sum()


def head_loss_sum_and_count(hidden: torch.Tensor, head, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`target_loss_sum_and_count(head(hidden), targets)` for rows `hidden` (N, H) and a linear `head` (V, H),
    written for exported graphs as sum_i [logsumexp_v(z_iv) - z_{i,t_i}] over the kept rows, the target's logit
    taken from its own head row, z_{i,t} = h_i . w_t (+ b_t). The backward of the (N, V) logits is then
    softmax times the upstream gradient alone: no one-hot rows scattered into an (N, V) zero tensor, and no
    runtime's log-softmax gradient kernel (ONNX Runtime's runs on one thread)."""
    import torch

    keep = targets != IGNORE
    safe = torch.where(keep, targets, torch.zeros_like(targets))
    picked = (hidden * head.weight.index_select(0, safe)).sum(-1)
    if head.bias is not None:
        picked = picked + head.bias.index_select(0, safe)
    # keepdim: ONNX Runtime 1.19's ReduceLogSumExp gradient builds an invalid graph without it (opset >= 13)
    log_normaliser = torch.logsumexp(head(hidden).float(), -1, keepdim=True).squeeze(-1)
    return ((log_normaliser - picked.float()) * keep).sum(), keep.sum()


def model_loss_sum_and_count(model, batch: dict, task: str, *, static_shapes: bool = False
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """`loss_sum_and_count` of the model's forward pass on `batch`. For a causal LM the output head (for
    SmolLM2 a 576 x 49,152 matmul, a fifth of the model's work) runs only at the positions that predict
    a target: the same value, far fewer FLOPs and no (B, T, V) logits tensor. `static_shapes` (an exported
    graph, whose shapes cannot depend on the labels): every position but the last instead, so the shift
    happens on the hidden states, and a plain linear head takes `head_loss_sum_and_count`."""
    from torch import nn

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if task != "causal-lm" or getattr(model.config, "final_logit_softcapping", None):
        return loss_sum_and_count(model(**inputs).logits, batch["labels"], task)
    hidden = getattr(model, model.base_model_prefix)(**inputs).last_hidden_state[:, :-1]
    targets = batch["labels"][:, 1:]
    head = model.get_output_embeddings()
    if not static_shapes:
        keep = targets != IGNORE
        return target_loss_sum_and_count(head(hidden[keep]), targets[keep])
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)  # one matmul, not a batched one
    if type(head) is nn.Linear:  # a LoRA-wrapped head (a user's target) keeps the plain loss
        return head_loss_sum_and_count(hidden, head, targets)
    return target_loss_sum_and_count(head(hidden), targets)
