"""What every training backend (torch, onnx, executorch) returns for one local round (it takes
hetlora.protocol.settings.TrainingSettings)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hetlora.protocol.wire import Adapter


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
