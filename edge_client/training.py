"""The torch training backend: one local round of LoRA training on a frozen base model.

Modes (the server's aggregation rule decides which one a client runs):
  plain    train at the downloaded rank (fedavg, hlora)
  hetlora  plain + self-pruning: loss = task + lambda * tail_penalty; if the tail term fell,
           r <- max(min_rank, floor(gamma r)) and the upload is truncated to that rank
  plora    Select-N-Fold: W_i = W0 + sum_{j not in indices} b_j a_j^T is folded into the frozen
           weights, only the components `indices` train, and they are uploaded in that order
The classification head (dense tensors) trains and uploads in every mode.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

from hetlora.protocol import adapter_ops
from edge_client.checkpointing import set_activation_checkpointing
from edge_client.data import Encoded, EncodingCache, Examples, make_batches, trim_batch
from edge_client.head_features import pooled_features
from edge_client.lora import extract_adapter, inject_lora, load_adapter, lora_layers, set_rank, tail_mask, tail_penalty
from hetlora.models.folders import default_targets
from hetlora.models.task_model import dense_parameter_names, load_task_model, load_tokenizer
from edge_client.objective import model_loss_sum_and_count
from edge_client.train_config import RoundResult, run_steps, self_pruned
from hetlora.protocol.settings import TrainingSettings
from hetlora.protocol.wire import Adapter
from hetlora.errors import UserError

MODES = ("plain", "hetlora", "plora")
EVAL_ROWS = 64  # at most this many rows in the fixed local evaluation set behind loss_before / loss_after


class TorchTrainer:
    """A frozen base model with LoRA layers, kept in memory across rounds of one client."""

    backend = "torch"

    def __init__(self, model_dir, task: str, labels: list[str] | None = None, targets=None, lora_alpha: float = 16.0,
                 pooling: str | None = None):
        torch.manual_seed(0)  # the fresh head is the same on every client
        self.task = task
        self.labels = labels
        self.lora_alpha = lora_alpha
        self.model = load_task_model(model_dir, task, len(labels) if labels else None, pooling=pooling)
        dense_names = set(dense_parameter_names(self.model, task))
        self.targets = tuple(targets or default_targets(model_dir))
        inject_lora(self.model, self.targets, rank=1, alpha=lora_alpha)
        self.dense = {n: p for n, p in self.model.named_parameters() if n in dense_names}
        self._initial_dense = {n: p.detach().clone() for n, p in self.dense.items()}
        self.tokenizer = load_tokenizer(model_dir)
        self._w0: dict[str, torch.Tensor] | None = None
        self.encode = EncodingCache(self.tokenizer)

    def train_round(self, start: Adapter, examples: Examples, cfg: TrainingSettings, *, rank: int, indices=None,
                    mode: str = "plain", on_step: Callable[[int, float], None] | None = None) -> RoundResult:
        """Load `start`, train on `examples`, return the adapter to upload (wire form) and the round's numbers."""
        t0 = time.perf_counter()
        if mode not in MODES:
            raise UserError(f"unknown training mode {mode!r}; choose one of {', '.join(MODES)}")
        if examples.task != self.task:
            raise UserError(f"examples are for {examples.task!r} but this trainer runs {self.task!r}")
        work = self._working_adapter(start, rank, indices, mode)
        encoded = self.encode(examples, cfg.seq_len)
        with self._folded(start, indices) if mode == "plora" else nullcontext():
            result = self._train(work, encoded, cfg, mode, on_step)
        result.n_samples = len(examples)
        result.seconds = time.perf_counter() - t0
        return result

    def frozen_features(self, examples: Examples, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(features (n, d), labels (n,)): the frozen base model's pooled features, what the head reads."""
        if self.task != "classification":
            raise UserError("head initialisation is for classification runs only")
        set_rank(self.model, 1, self.lora_alpha)  # zero factors: the frozen base model's features
        encoded = self.encode(examples, seq_len)
        try:
            return pooled_features(self.model, self.dense, encoded), np.asarray(encoded.labels, dtype=np.int64)
        except ValueError as exc:
            raise UserError(f"cannot compute head features: {exc}") from None

    def _working_adapter(self, start: Adapter, rank: int, indices, mode: str) -> Adapter:
        if mode == "plora":
            if indices is None or len(indices) != rank:
                raise UserError(f"plora needs exactly rank={rank} selected indices, got {indices!r}")
            return adapter_ops.select(start, indices)
        if start.rank < rank:
            raise UserError(f"the downloaded adapter has rank {start.rank}, below the assigned rank {rank}")
        return adapter_ops.truncate(start, rank) if start.rank > rank else start

    def _train(self, work: Adapter, encoded: Encoded, cfg: TrainingSettings, mode: str, on_step) -> RoundResult:
        torch.manual_seed(cfg.seed)
        self._load(work)
        rank = work.rank
        eval_batches = evaluation_batches(encoded, cfg)
        mask = tail_mask(rank, cfg.prune_gamma) if mode == "hetlora" and cfg.prune_lambda > 0 else None
        loss_before = self.mean_loss(eval_batches)
        tail_before = self._tail(mask)
        steps = run_steps(self._step_function(cfg, mask), encoded, cfg, on_step)
        self.model.eval()
        tail_after = self._tail(mask)
        upload = extract_adapter(self.model, self.dense)
        pruned = self_pruned(upload, rank, cfg, tail_before, tail_after) if mask is not None else None
        if pruned is not None:
            upload = pruned
            self._load(upload)
        return RoundResult(adapter=upload, rank_before=rank, rank_after=upload.rank, loss_before=loss_before,
                           loss_after=self.mean_loss(eval_batches), tail_before=tail_before, tail_after=tail_after,
                           steps=steps, n_samples=len(encoded), seconds=0.0)

    def stepper(self, start: Adapter, cfg: TrainingSettings) -> Callable[[dict], float]:
        """Load `start` (wire form) and return `step(batch) -> loss`: one forward, backward and optimizer
        update of plain-mode training, for callers that time single steps (hetlora bench)."""
        torch.manual_seed(cfg.seed)
        self._load(start)
        return self._step_function(cfg, None)

    def _step_function(self, cfg: TrainingSettings, mask: torch.Tensor | None) -> Callable[[dict], float]:
        """Make the LoRA factors and the head trainable and return one optimizer step:
        loss = task loss (+ prune_lambda * tail_penalty when `mask` is given)."""
        factors = [p for layer in lora_layers(self.model).values() for p in (layer.lora_A, layer.lora_B)]
        head = list(self.dense.values())
        for p in factors + head:
            p.requires_grad_(True)
        optimizer = make_optimizer(factors, head, cfg)
        schedule = make_schedule(optimizer, cfg)
        self.model.train(cfg.dropout)
        set_activation_checkpointing(self.model, cfg.activation_checkpointing)

        def step(batch: dict) -> float:
            total, count = model_loss_sum_and_count(self.model, batch, self.task)
            loss = total / count.clamp(min=1)
            if mask is not None:
                loss = loss + cfg.prune_lambda * tail_penalty(self.model, mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            return float(loss.detach())

        return step

    def _load(self, adapter: Adapter) -> None:
        """Wire adapter -> training form; dense tensors it lacks get the fresh head."""
        for name, p in self.dense.items():
            if name not in adapter.dense:
                with torch.no_grad():
                    p.copy_(self._initial_dense[name])
        load_adapter(self.model, adapter, self.dense, self.lora_alpha)

    def _tail(self, mask: torch.Tensor | None) -> float:
        if mask is None:
            return 0.0
        with torch.no_grad():
            return float(tail_penalty(self.model, mask))

    @torch.no_grad()
    def mean_loss(self, batches: list[dict]) -> float:
        """Token- (or row-) mean task loss over all targets of `batches` (each trimmed of its padding columns)."""
        total, count = 0.0, 0
        for batch in batches:
            s, c = model_loss_sum_and_count(self.model, trim_batch(batch), self.task)
            total, count = total + float(s), count + int(c)
        return total / max(count, 1)

    @contextmanager
    def _folded(self, start: Adapter, indices):
        """Fold the unselected components of `start` into the frozen weights; restore W0 exactly after."""
        layers = lora_layers(self.model)
        if self._w0 is None:
            self._w0 = {name: layer.base.weight.detach().clone() for name, layer in layers.items()}
        try:
            fold_unselected(layers, self._w0, start, indices)
            yield
        finally:
            with torch.no_grad():
                for name, layer in layers.items():
                    layer.base.weight.copy_(self._w0[name])


def fold_unselected(layers: dict, w0: dict[str, torch.Tensor], start: Adapter, indices) -> None:
    """base.weight <- W0 + B[:, u] @ A[u, :] with u the components not in `indices` (wire form, scale folded)."""
    chosen = set(adapter_ops.check_indices(indices, start.rank))
    unselected = [j for j in range(start.rank) if j not in chosen]
    with torch.no_grad():
        for name, layer in layers.items():
            weight = w0[name].clone()
            if unselected and name in start.lora:
                a, b = start.lora[name]
                weight += torch.from_numpy(np.ascontiguousarray(b[:, unselected])) @ torch.from_numpy(
                    np.ascontiguousarray(a[unselected]))
            layer.base.weight.copy_(weight)


def evaluation_rows(n_rows: int, cfg: TrainingSettings) -> int:
    """Rows of the fixed local evaluation set: a quarter of the rows the round trains on (steps x batch, or
    epochs x the data), at least one batch and at most EVAL_ROWS and the data. Its forward passes before and
    after training then cost about a sixth of the round's training instead of matching it on short rounds."""
    trained = cfg.steps * cfg.batch_size if cfg.steps else (cfg.epochs or 1) * n_rows
    return min(n_rows, EVAL_ROWS, max(cfg.batch_size, trained // 4))


def evaluation_batches(encoded: Encoded, cfg: TrainingSettings) -> list[dict]:
    """The fixed local evaluation set: `evaluation_rows` rows picked by a seed-0 permutation, unshuffled
    batches of the round's batch size."""
    rows = np.sort(np.random.default_rng(0).permutation(len(encoded))[:evaluation_rows(len(encoded), cfg)])
    subset = Encoded(encoded.task, encoded.input_ids[rows], encoded.attention_mask[rows], encoded.labels[rows],
                     encoded.lengths[rows])
    return make_batches(subset, cfg.batch_size, seed=0, shuffle=False)


def make_optimizer(factors, head, cfg: TrainingSettings) -> torch.optim.Optimizer:
    """One optimizer, two parameter groups: LoRA factors at `lr`, the dense head at `head_lr` (default `lr`)."""
    groups = [{"params": factors, "lr": cfg.lr}]
    if head:
        groups.append({"params": head, "lr": cfg.lr if cfg.head_lr is None else cfg.head_lr})
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, weight_decay=cfg.weight_decay)
    raise UserError(f"unknown optimizer {cfg.optimizer!r}; choose adamw or sgd")


def make_schedule(optimizer: torch.optim.Optimizer, cfg: TrainingSettings) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-step multiplier of every group's lr (TrainingSettings.schedule)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, cfg=cfg))


def lr_factor(step: int, cfg: TrainingSettings) -> float:
    """Multiplier of the base lr at 0-based `step`: 1 (constant), or linear warm-up then cosine decay to 0."""
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule != "cosine":
        raise UserError(f"unknown schedule {cfg.schedule!r}; choose constant or cosine")
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    total = max((cfg.steps or 1) - cfg.warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - cfg.warmup_steps, total) / total))

