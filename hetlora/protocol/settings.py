"""The local training settings: one type, carried by the server's run config and a client's round plan,
taken by every training backend. JSON form: the field names and values (`to_json` / `from_json`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

FLOATS = {"lr", "head_lr", "head_fit_lr", "weight_decay", "lora_alpha", "prune_gamma", "prune_lambda"}
STRINGS = {"schedule", "optimizer"}
BOOLS = {"trim_padding", "dropout", "activation_checkpointing"}
OPTIONAL = {"steps", "epochs", "head_lr"}
LR_DECAYS = ("none", "cosine")  # learning rates across a run's LoRA rounds (TrainingSettings.decayed)
# Sane bounds of a plan (TrainingSettings.problem): beyond them a plan would wedge or crash a device.
MAX_STEPS = 100_000
MAX_EPOCHS = 1_000
MAX_BATCH = 65_536
MAX_SEQ_LEN = 131_072


@dataclass(frozen=True)
class TrainingSettings:
    """Local training settings (what the server's run config carries and every backend takes).
    `steps` wins over `epochs` when both are set.

    Self-pruning (HetLoRA): loss = task loss + prune_lambda * sum_layers ||B[:, p:r]||_F ||A[p:r, :]||_F,
    p = floor(prune_gamma * r); after the round, if that tail term fell, r <- max(min_rank, floor(gamma r)).
    `prune_lambda = 0` disables the regulariser and pruning.

    Learning rates: `lr` for the LoRA factors, `head_lr` for the dense head (None: `lr`); both follow
    `schedule` over the round's steps: "constant", or "cosine" (linear warm-up over `warmup_steps`,
    then lr_t = lr * (1 + cos(pi * t' / T')) / 2 over the remaining T' steps).
    `head_epochs`, `head_fit_lr`: the passes over the frozen features in a head round and their Adam
    learning rate (edge_client.head_fit), with batches of `batch_size`.
    `trim_padding`: length-grouped batches cut to their longest row (the artifact backends take the
    same batches and pad them back to their exported width, masked: the same loss).
    `activation_checkpointing`: the torch backend keeps only each layer's input and recomputes the layer in
    backward: the same loss and gradients in less memory, at about 40% more step time (the artifact backends'
    exported graphs are fixed and ignore it).
    """

    steps: int | None = 20
    epochs: int | None = None
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 5e-4
    head_lr: float | None = None
    schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    head_epochs: int = 5
    head_fit_lr: float = 2e-3
    trim_padding: bool = True
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | sgd, on every backend (artifact backends step it in the client)
    seed: int = 0
    lora_alpha: float = 16.0
    prune_gamma: float = 0.99
    prune_lambda: float = 0.0
    min_rank: int = 4
    dropout: bool = False  # the base model's own dropout during local training
    activation_checkpointing: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict) -> "TrainingSettings":
        """Settings from their JSON form; fields it leaves out keep their defaults. ValueError names an
        unknown field or a value of the wrong type."""
        if not isinstance(doc, dict):
            raise ValueError(f"training settings must be a JSON object, got {str(doc)[:40]}")
        return cls().updated(doc)

    def updated(self, changes: dict) -> "TrainingSettings":
        """These settings with `changes` (field -> value) applied; ValueError for an unknown field or a bad type."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown training setting {unknown[0]!r}; known: {', '.join(sorted(known))}")
        for name, value in changes.items():
            if not _fits(name, value):
                raise ValueError(f"training setting {name!r} has the wrong type: {str(value)[:40]}")
        return replace(self, **changes)

    def problem(self) -> str | None:
        """The first setting outside sane bounds, as one line (None when all are sane): steps, epochs and
        warm-up within MAX_STEPS / MAX_EPOCHS, batch and sequence length at least 1, learning rates, alpha and
        the regulariser finite (lr, head_fit_lr, lora_alpha > 0; head_lr, weight_decay, prune_lambda >= 0),
        prune_gamma in (0, 1], min_rank >= 1, a known schedule and optimiser."""
        counts = [("steps", self.steps, 1, MAX_STEPS, True), ("epochs", self.epochs, 1, MAX_EPOCHS, True),
                  ("batch_size", self.batch_size, 1, MAX_BATCH, False), ("seq_len", self.seq_len, 1, MAX_SEQ_LEN, False),
                  ("warmup_steps", self.warmup_steps, 0, MAX_STEPS, False),
                  ("head_epochs", self.head_epochs, 1, MAX_EPOCHS, False), ("min_rank", self.min_rank, 1, None, False)]
        for name, value, low, high, optional in counts:
            if value is None and optional:
                continue
            if not isinstance(value, int) or value < low or (high is not None and value > high):
                return f"{name} = {value} is outside {low}..{high if high is not None else 'any'}"
        rates = [("lr", self.lr, False), ("head_fit_lr", self.head_fit_lr, False), ("lora_alpha", self.lora_alpha, False),
                 ("head_lr", self.head_lr, True), ("weight_decay", self.weight_decay, True),
                 ("prune_lambda", self.prune_lambda, True)]
        for name, value, zero_ok in rates:
            if value is None and name == "head_lr":
                continue
            if not (math.isfinite(value) and (value >= 0 if zero_ok else value > 0)):
                return f"{name} = {value} must be finite and {'at least 0' if zero_ok else 'above 0'}"
        if not 0 < self.prune_gamma <= 1:
            return f"prune_gamma = {self.prune_gamma} must be in (0, 1]"
        if self.schedule not in ("constant", "cosine") or self.optimizer not in ("adamw", "sgd"):
            return f"unknown schedule {self.schedule!r} or optimizer {self.optimizer!r}"
        return None

    def decayed(self, decay: str, t: float, total: int) -> "TrainingSettings":
        """These settings for LoRA round t of `total` (t = 0 first). decay "cosine": lr and head_lr (None:
        lr) scaled by (1 + cos(pi t / total)) / 2, on top of `schedule` within the round; "none": unchanged."""
        if decay == "none":
            return self
        factor = (1 + math.cos(math.pi * t / total)) / 2
        head_lr = self.head_lr if self.head_lr is not None else self.lr
        return replace(self, lr=self.lr * factor, head_lr=head_lr * factor)

    def capped(self, batch_size: int | None, seq_len: int | None,
               activation_checkpointing: bool = False) -> "TrainingSettings":
        """Batch size and sequence length at most the given limits (a device tier's); None: no limit. A tier that
        needs activation checkpointing turns it on."""
        return replace(self, batch_size=min(self.batch_size, batch_size or self.batch_size),
                       seq_len=min(self.seq_len, seq_len or self.seq_len),
                       activation_checkpointing=self.activation_checkpointing or activation_checkpointing)


def _fits(name: str, value) -> bool:
    """Whether `value` has the JSON type of setting `name` (bool is not a number; an int is a float)."""
    if value is None:
        return name in OPTIONAL
    if name in BOOLS:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if name in STRINGS:
        return isinstance(value, str)
    return isinstance(value, (int, float) if name in FLOATS else int)
