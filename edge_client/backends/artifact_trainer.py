"""One local round on a fixed-shape exported artifact (ONNX Runtime or ExecuTorch), same contract as TorchTrainer.

The artifact of the smallest exported rank R >= r serves a client at rank r: the wire factors are
zero-padded to R, `keep_mask` = [1]*r + [0]*(R-r) silences the padding (it gets zero gradient and
stays exactly zero), `lora_scale` = lora_scale(alpha, r) and the tail mask marks floor(gamma r)..r-1,
so training equals the torch backend at rank r. Batches come from edge_client.data (the torch
backend's batching, trimmed or not as the plan says) and are padded back to the exported (batch, seq_len)
with masked, ignored positions. The artifact returns the loss and gradients; the plan's optimiser
(edge_client.backends.client_optimizer) updates the parameters in the client, as the torch backend does.
Pruning uses hetlora.protocol.lora_rules.should_prune / pruned_rank, as the torch backend does.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import numpy as np

from hetlora.protocol import adapter_ops
from edge_client.backends.artifacts import Artifact, load_manifest
from edge_client.backends.freed_memory import return_freed_memory
from edge_client.data import EncodingCache, Examples
from hetlora.models.folders import model_hash
from hetlora.models.task_model import dense_parameter_names, load_task_model, load_tokenizer
from edge_client.objective import IGNORE
from hetlora.protocol.lora_rules import lora_scale
from edge_client.train_config import RoundResult, run_steps, self_pruned
from hetlora.protocol.settings import TrainingSettings
from hetlora.protocol.wire import LORA_A, LORA_B, Adapter
from hetlora.errors import UserError
from edge_client.head_features import pooled_features
from edge_client.training import evaluation_batches
from edge_client.backends.client_optimizer import ClientOptimizer

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
MODES = ("plain", "hetlora")


class Engine(Protocol):
    """A loaded training artifact. Inputs follow the manifest's `inputs`; outputs (loss, task_loss, tail, n_targets).
    It computes losses and gradients only: the optimiser runs in the client (ClientOptimizer)."""

    rank: int

    def parameters(self) -> dict[str, torch.Tensor]: ...  # trainable, training form, sharing the runtime's memory

    def forward_backward(self, inputs: list[np.ndarray]) -> list[float]: ...  # fresh gradients of output 0

    def gradients(self) -> dict[str, torch.Tensor]: ...  # of the last forward_backward

    def evaluate(self, inputs: list[np.ndarray]) -> list[float]: ...


class ArtifactTrainer:
    """Trains from the artifacts in `artifacts_dir` with an `Engine` class for one backend."""

    backend = ""

    def __init__(self, model_dir, task: str, labels: list[str] | None = None, targets=None, lora_alpha: float = 16.0,
                 *, artifacts_dir=None, pooling: str | None = None):
        if artifacts_dir is None:
            raise UserError(f"--backend {self.backend} trains from exported artifacts: pass --artifacts DIR "
                            "(the folder written by `hetlora export`, copied to this device)")
        self.model_dir, self.task, self.labels, self.pooling = model_dir, task, labels, pooling
        self.lora_alpha = float(lora_alpha)
        self.manifest = load_manifest(artifacts_dir)
        self.manifest.require(self.backend)
        self.manifest.check_compatible(model_hash=model_hash(model_dir), task=task, targets=targets,
                                       lora_alpha=self.lora_alpha)
        if labels and int(self.manifest.doc.get("num_labels") or 0) != len(labels):
            raise UserError(f"the artifacts were exported for {self.manifest.doc.get('num_labels')} labels, "
                            f"the run has {len(labels)}; re-export with the run's label list")
        self.tokenizer = load_tokenizer(model_dir)
        self.engine: Engine | None = None
        self._initial: dict[str, np.ndarray] = {}
        self.encode = EncodingCache(self.tokenizer)

    # --- subclasses -------------------------------------------------------------------------------------------
    def open_engine(self, artifact: Artifact) -> Engine:
        raise NotImplementedError

    # --- round 0 ------------------------------------------------------------------------------------------------
    def frozen_features(self, examples: Examples, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels) under the frozen base model, computed with torch (an artifact has no features
        output); the model is loaded for this call and dropped after."""
        if self.task != "classification":
            raise UserError("head initialisation is for classification runs only")
        model = load_task_model(self.model_dir, self.task, len(self.labels), pooling=self.pooling)
        encoded = self.encode(examples, seq_len)
        try:
            features = pooled_features(model, dense_parameter_names(model, self.task), encoded)
        except ValueError as exc:
            raise UserError(f"cannot compute head features: {exc}") from None
        return features, np.asarray(encoded.labels, dtype=np.int64)

    # --- the round ----------------------------------------------------------------------------------------------
    def engine_for(self, rank: int) -> Engine:
        """The engine of the artifact that serves `rank` (verified by sha256, loaded once per rank tier)."""
        artifact = self.manifest.artifact(self.backend, rank)
        if self.engine is None or self.engine.rank != artifact.rank:
            self.manifest.verify(artifact)
            self.artifact = artifact
            self.engine = None  # a tier change: free the old program before the new one loads (peak = one)
            gc.collect()
            return_freed_memory()
            self.engine = self.open_engine(artifact)
            self._initial = self.read()
        return self.engine

    def train_round(self, start: Adapter, examples: Examples, cfg: TrainingSettings, *, rank: int, indices=None,
                    mode: str = "plain", on_step: Callable[[int, float], None] | None = None) -> RoundResult:
        """Load `start` (wire form), train, prune (hetlora), return the upload in wire form; see TorchTrainer."""
        t0 = time.perf_counter()
        if mode == "plora":
            raise UserError(f"the {self.backend} backend cannot run Fed-PLoRA (Select-N-Fold changes the frozen "
                            "weights, which are fixed inside an exported artifact); use --backend torch")
        if mode not in MODES:
            raise UserError(f"unknown training mode {mode!r}; choose one of plain, hetlora, plora")
        if examples.task != self.task:
            raise UserError(f"examples are for {examples.task!r} but this trainer runs {self.task!r}")
        if start.rank < rank:
            raise UserError(f"the downloaded adapter has rank {start.rank}, below the assigned rank {rank}")
        if cfg.dropout:
            raise UserError(f"the {self.backend} artifacts are exported without dropout; turn dropout off or use "
                            "--backend torch")
        work = adapter_ops.truncate(start, rank) if start.rank > rank else start
        engine = self.engine_for(rank)
        self._check_shape(cfg)
        encoded = self.encode(examples, cfg.seq_len)
        pruning = mode == "hetlora" and cfg.prune_lambda > 0
        lam = cfg.prune_lambda if pruning else 0.0
        tail = padded_tail_mask(rank, engine.rank, cfg.prune_gamma) if pruning else np.zeros(engine.rank, np.float32)

        self.load(work)
        eval_batches = evaluation_batches(encoded, cfg)
        loss_before = self.mean_loss(eval_batches, rank)
        tail_before = self.tail_value(tail) if pruning else 0.0
        steps = run_steps(self._step_function(cfg, rank, tail, lam), encoded, cfg, on_step)
        tail_after = self.tail_value(tail) if pruning else 0.0
        upload = self.extract(rank)
        pruned = self_pruned(upload, rank, cfg, tail_before, tail_after) if pruning else None
        if pruned is not None:
            upload = pruned
            self.load(upload)
        loss_after = self.mean_loss(eval_batches, upload.rank)
        return RoundResult(adapter=upload, rank_before=rank, rank_after=upload.rank, loss_before=loss_before,
                           loss_after=loss_after, tail_before=tail_before, tail_after=tail_after, steps=steps,
                           n_samples=len(examples), seconds=time.perf_counter() - t0,
                           extra={"backend": self.backend, "artifact_rank": engine.rank})

    def stepper(self, start: Adapter, cfg: TrainingSettings, rank: int) -> Callable[[dict], float]:
        """Load `start` (wire form) at `rank` and return `step(batch) -> loss`: one plain-mode step of a round
        (forward + backward in the artifact, the plan's optimiser in the client), for hetlora bench."""
        self.engine_for(rank)
        self.load(start)
        return self._step_function(cfg, rank, np.zeros(self.engine.rank, np.float32), 0.0)

    def _step_function(self, cfg: TrainingSettings, rank: int, tail: np.ndarray, lam: float) -> Callable[[dict], float]:
        """A fresh optimiser of the plan over the engine's parameters (the head at head_lr), and one step."""
        engine = self.engine
        head = {name for name, wire in self.manifest.parameters.items() if not is_factor(wire)}
        optimizer = ClientOptimizer(engine.parameters(), head, cfg)

        def step(batch: dict) -> float:
            loss = engine.forward_backward(self.inputs(batch, rank, tail, lam))[0]
            optimizer.step(engine.gradients())
            return loss

        return step

    def _check_shape(self, cfg: TrainingSettings) -> None:
        b, t = self.manifest.batch, self.manifest.seq_len
        if cfg.batch_size > b or cfg.seq_len > t:
            raise UserError(f"the artifacts were exported for batch {b} x seq_len {t}; this round asks for "
                            f"{cfg.batch_size} x {cfg.seq_len}: lower --batch-size/--seq-len or re-export larger")

    # --- conversions ------------------------------------------------------------------------------------------
    def read(self) -> dict[str, np.ndarray]:
        """Copies of the trainable parameters (training form, artifact rank) by artifact name."""
        return {name: p.detach().numpy().copy() for name, p in self.engine.parameters().items()}

    def write(self, values: dict[str, np.ndarray]) -> None:
        """Copy `values` (artifact name -> array) into the runtime's parameters."""
        import torch

        params = self.engine.parameters()
        for name, value in values.items():
            params[name].copy_(torch.from_numpy(np.ascontiguousarray(value, np.float32)))

    def load(self, adapter: Adapter) -> None:
        """Wire -> training form, zero-padded to the artifact rank: A = A_wire, B = B_wire / s."""
        engine = self.engine
        r, big = adapter.rank, engine.rank
        scale = lora_scale(self.lora_alpha, r) if r else 1.0
        values = {}
        for name, wire in self.manifest.parameters.items():
            if wire.endswith(LORA_A):
                a = adapter.lora[wire[: -len(LORA_A)]][0]
                values[name] = pad_rows(np.asarray(a, np.float32), big)
            elif wire.endswith(LORA_B):
                b = adapter.lora[wire[: -len(LORA_B)]][1]
                values[name] = pad_cols(np.asarray(b, np.float32) / np.float32(scale), big)
            else:
                values[name] = np.asarray(adapter.dense.get(wire, self._initial[name]), np.float32)
        self.write(values)

    def extract(self, rank: int) -> Adapter:
        """Training form -> wire, truncated to `rank`: A[:r], s * B[:, :r], dense tensors."""
        scale = np.float32(lora_scale(self.lora_alpha, rank))
        current = self.read()
        lora: dict[str, list] = {}
        dense = {}
        for name, wire in self.manifest.parameters.items():
            if wire.endswith(LORA_A):
                lora.setdefault(wire[: -len(LORA_A)], [None, None])[0] = current[name][:rank].copy()
            elif wire.endswith(LORA_B):
                lora.setdefault(wire[: -len(LORA_B)], [None, None])[1] = current[name][:, :rank] * scale
            else:
                dense[wire] = current[name].copy()
        return Adapter(lora={k: (a, b) for k, (a, b) in lora.items()}, dense=dense)

    def tail_value(self, tail: np.ndarray) -> float:
        """sum over modules of ||B (.) tail||_F ||A (.) tail||_F on the training-form factors."""
        current = self.read()
        factors: dict[str, list] = {}
        for name, wire in self.manifest.parameters.items():
            if wire.endswith(LORA_A):
                factors.setdefault(wire[: -len(LORA_A)], [None, None])[0] = current[name]
            elif wire.endswith(LORA_B):
                factors.setdefault(wire[: -len(LORA_B)], [None, None])[1] = current[name]
        return float(sum(np.linalg.norm(b * tail) * np.linalg.norm(a * tail[:, None]) for a, b in factors.values()))

    def inputs(self, batch: dict, rank: int, tail: np.ndarray, lam: float) -> list[np.ndarray]:
        """Artifact inputs for one batch, padded to the exported shape."""
        ids, mask, labels = pad_batch(batch, self.manifest.batch, self.manifest.seq_len, self.tokenizer.pad_token_id)
        keep = np.zeros(self.engine.rank, np.float32)
        keep[:rank] = 1.0
        return [ids, mask, labels, keep, tail, np.array(lam, np.float32),
                np.array(lora_scale(self.lora_alpha, rank) if rank else 1.0, np.float32)]

    def mean_loss(self, batches: list[dict], rank: int) -> float:
        """Target-weighted mean task loss over `batches` (the torch backend's loss_before/loss_after)."""
        zeros = np.zeros(self.engine.rank, np.float32)
        total, count = 0.0, 0
        for batch in batches:
            _, task_loss, _, n = self.engine.evaluate(self.inputs(batch, rank, zeros, 0.0))
            total, count = total + task_loss * n, count + int(n)
        return total / max(count, 1)


def is_factor(wire: str) -> bool:
    """Whether a wire name is a LoRA factor (else a dense tensor: the head)."""
    return wire.endswith((LORA_A, LORA_B))


def padded_tail_mask(rank: int, artifact_rank: int, gamma: float) -> np.ndarray:
    """(artifact_rank,) mask: 1 on floor(gamma rank)..rank-1 (edge_client.lora.tail_mask), 0 elsewhere."""
    mask = np.zeros(artifact_rank, np.float32)
    mask[math.floor(gamma * rank):rank] = 1.0
    return mask


def pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    out = np.zeros((rows, a.shape[1]), np.float32)
    out[: a.shape[0]] = a
    return out


def pad_cols(b: np.ndarray, cols: int) -> np.ndarray:
    out = np.zeros((b.shape[0], cols), np.float32)
    out[:, : b.shape[1]] = b
    return out


def pad_batch(batch: dict, batch_size: int, seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, attention_mask, labels) int64, padded to (batch_size, seq_len): pad columns are masked and
    ignored, filler rows copy row 0 with every label IGNORE, so the loss and gradients are unchanged."""
    ids = np.asarray(batch["input_ids"], np.int64)
    mask = np.asarray(batch["attention_mask"], np.int64)
    labels = np.asarray(batch["labels"], np.int64)
    b, t = ids.shape
    out_ids = np.full((batch_size, seq_len), pad_id, np.int64)
    out_mask = np.zeros((batch_size, seq_len), np.int64)
    out_ids[:b, :t], out_mask[:b, :t] = ids, mask
    out_ids[b:], out_mask[b:] = out_ids[0], out_mask[0]
    if labels.ndim == 2:
        out_labels = np.full((batch_size, seq_len), IGNORE, np.int64)
        out_labels[:b, :t] = labels
    else:
        out_labels = np.full(batch_size, IGNORE, np.int64)
        out_labels[:b] = labels
    return out_ids, out_mask, out_labels
