"""What every training backend (torch, onnx, executorch) shares for one local round (it takes
hetlora.protocol.settings.TrainingSettings): the step loop, the self-pruning decision, the RoundResult it returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from edge_client.data import training_batches
from hetlora.protocol import adapter_ops
from hetlora.protocol.lora_rules import pruned_rank, should_prune
from hetlora.protocol.settings import TrainingSettings
from hetlora.protocol.wire import Adapter


def run_steps(step: Callable[[dict], float], encoded, cfg: TrainingSettings, on_step=None) -> int:
    """The round's training loop: `step(batch) -> loss` over data.training_batches (seeded, fixed-shape, the plan's
    steps or epochs, padding trimmed as it says), `on_step(steps, loss)` after each; returns the steps taken."""
    steps = 0
    for batch in training_batches(encoded, cfg.batch_size, seed=cfg.seed, steps=cfg.steps, epochs=cfg.epochs,
                                  trim=cfg.trim_padding):
        loss = step(batch)
        steps += 1
        if on_step is not None:
            on_step(steps, loss)
    return steps


def self_pruned(upload: Adapter, rank: int, cfg: TrainingSettings, tail_before: float,
                tail_after: float) -> Adapter | None:
    """HetLoRA's self-pruning after a rank-`rank` round (hetlora.protocol.lora_rules): the upload truncated to the
    pruned rank when the tail penalty fell enough, else None."""
    if not should_prune(rank, prune_lambda=cfg.prune_lambda, gamma=cfg.prune_gamma, min_rank=cfg.min_rank,
                        tail_before=tail_before, tail_after=tail_after):
        return None
    return adapter_ops.truncate(upload, pruned_rank(rank, cfg.prune_gamma, cfg.min_rank))


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
