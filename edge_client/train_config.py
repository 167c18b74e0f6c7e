"""What every training backend (torch, onnx, executorch) takes and returns for one local round."""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_client.wire import Adapter


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings. `steps` wins over `epochs` when both are set.

    Self-pruning (HetLoRA): loss = task loss + prune_lambda * sum_layers ||B[:, p:r]||_F ||A[p:r, :]||_F,
    p = floor(prune_gamma * r); after the round, if that tail term fell, r <- max(min_rank, floor(gamma r)).
    `prune_lambda = 0` disables the regulariser and pruning.

    Learning rates: `lr` for the LoRA factors, `head_lr` for the dense head (None: `lr`); both follow
    `schedule` over the round's steps: "constant", or "cosine" (linear warm-up over `warmup_steps`,
    then lr_t = lr * (1 + cos(pi * t' / T')) / 2 over the remaining T' steps).
    `trim_padding`: length-grouped batches cut to their longest row (torch backend only; the artifact
    backends keep fixed shapes and uniformly shuffled batches, which the torch backend reproduces
    exactly with trim_padding=False).
    """

    steps: int | None = 20
    epochs: int | None = None
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 5e-4
    head_lr: float | None = None
    schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    trim_padding: bool = True
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | sgd (ExecuTorch offers only sgd)
    seed: int = 0
    lora_alpha: float = 16.0
    prune_gamma: float = 0.99
    prune_lambda: float = 0.0
    min_rank: int = 4
    dropout: bool = False  # the base model's own dropout during local training


@dataclass
class RoundResult:
    """One local round: the adapter to upload (wire form, possibly pruned) and what happened."""

    adapter: Adapter
    rank_before: int
    rank_after: int
    loss_before: float  # mean task loss on fixed local evaluation batches, before training
    loss_after: float  # the same batches, after training (and pruning)
    tail_before: float  # tail penalty term before and after training (0 without pruning)
    tail_after: float
    steps: int
    n_samples: int
    seconds: float
    extra: dict = field(default_factory=dict)
