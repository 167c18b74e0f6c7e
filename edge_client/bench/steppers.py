"""One training step per backend, ready to time: `prepare(rank) -> (step, computed_rank)`.

A step is forward + backward + optimizer update on one fixed, full-length synthetic batch, the code path
of a real round (plain mode, AdamW with the default TrainingSettings) on every backend:
- torch: TorchTrainer.stepper;
- onnx / executorch: ArtifactTrainer.stepper (the artifact's forward + backward, AdamW in the client).
  The artifact of the smallest exported rank R >= r serves rank r (keep_mask silences the padding), so its
  kernels compute at R: `computed_rank`.
`skip_reason` says why a backend cannot run here (missing runtime, no artifacts, wrong shape).
"""

from __future__ import annotations

import importlib.util
import platform

import numpy as np

from edge_client.backends.artifacts import Manifest
from hetlora.protocol.settings import TrainingSettings
from hetlora.protocol.wire import Adapter, decode
from edge_client.backends import make_trainer

ARTIFACT_RUNTIMES = {
    "onnx": ("onnxruntime.training", "onnxruntime-training (PyPI wheels: Linux x86_64, macOS, Windows; "
                                     "pip install onnxruntime-training-cpu==1.19.2)"),
    "executorch": ("executorch.extension.pybindings._C", "executorch with its runtime bindings "
                                                            "(pip install executorch==1.5.1)"),
}
BACKENDS = ("torch", *ARTIFACT_RUNTIMES)


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def skip_reason(backend: str, manifest: Manifest | None, batch: int, seq_len: int) -> str | None:
    """Why `backend` cannot be benchmarked on this platform with these artifacts, or None."""
    if backend == "torch":
        return None if importable("torch") else "torch is not installed"
    module, package = ARTIFACT_RUNTIMES[backend]
    if not importable(module):
        return f"{package} is not installed on this {platform.machine()} platform"
    if manifest is None:
        return f"no --artifacts DIR given: the {backend} backend trains from artifacts made by `hetlora export`"
    if not manifest.ranks(backend):
        return f"{manifest.folder} holds no {backend} artifacts (exported: " \
               f"{sorted({a['backend'] for a in manifest.doc['artifacts']})})"
    if (manifest.batch, manifest.seq_len) != (batch, seq_len):
        return (f"the artifacts were exported for batch {manifest.batch} x seq_len {manifest.seq_len}, the bench "
                f"runs {batch} x {seq_len}: drop --batch-size/--seq-len or re-export at that shape")
    return None


def synthetic_batch(batch: int, seq_len: int, vocab: int, num_labels: int | None,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """Full-length rows (every position attended) of random token ids, and random class labels, or for a
    causal LM (`num_labels` None) every next token as a target."""
    rng = np.random.default_rng(seed)
    low = 1000 if vocab > 2000 else 1  # skip BERT's special and unused ids
    ids = rng.integers(low, vocab, (batch, seq_len), dtype=np.int64)
    labels = ids.copy() if num_labels is None else rng.integers(0, num_labels, batch, dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones((batch, seq_len), np.int64), "labels": labels}


def start_adapter(spec, rank: int, head: dict[str, np.ndarray] | None = None) -> Adapter:
    """A rank-`rank` adapter as a round starts it (wire form): A small random, B zero, and `head` (bench --adapter's
    dense tensors) or the model's own head."""
    rng = np.random.default_rng(rank)
    return Adapter(lora={name: (rng.normal(0.0, 0.02, (rank, m.in_features)).astype(np.float32),
                                np.zeros((m.out_features, rank), np.float32)) for name, m in spec.modules.items()},
                   dense=dict(head or {}))


def adapter_dense(path: str) -> dict[str, np.ndarray]:
    """The dense tensors (the classification head) of the wire adapter at `path` (checked by cli_bench first)."""
    from pathlib import Path

    return decode(Path(path).read_bytes()).dense


class TorchStepper:
    backend = "torch"

    def __init__(self, model_dir, task: str, spec, targets, num_labels: int | None, lora_alpha: float,
                 batch: dict[str, np.ndarray], head: dict[str, np.ndarray] | None = None):
        import torch

        self.spec, self.head = spec, head or {}
        labels = [str(i) for i in range(num_labels)] if num_labels else None
        self.trainer = make_trainer("torch", model_dir=model_dir, task=task, labels=labels, targets=targets,
                                    lora_alpha=lora_alpha)
        self.batch = {k: torch.from_numpy(v) for k, v in batch.items()}

    def prepare(self, rank: int):
        step = self.trainer.stepper(start_adapter(self.spec, rank, self.head), TrainingSettings())
        return (lambda: step(self.batch)), rank


class ArtifactStepper:
    def __init__(self, backend: str, model_dir, task: str, artifacts_dir, spec, targets, lora_alpha: float,
                 batch: dict[str, np.ndarray], head: dict[str, np.ndarray] | None = None):
        self.backend, self.spec, self.head = backend, spec, head or {}
        self.trainer = make_trainer(backend, model_dir=model_dir, task=task, targets=targets,
                                    lora_alpha=lora_alpha, artifacts_dir=artifacts_dir)
        self.batch = batch

    def prepare(self, rank: int):
        """Raises UserError when no exported artifact covers `rank`."""
        step = self.trainer.stepper(start_adapter(self.spec, rank, self.head), TrainingSettings(), rank)
        return (lambda: step(self.batch)), self.trainer.engine.rank


def open_stepper(backend: str, *, model_dir, task: str, artifacts_dir, spec, targets, num_labels: int | None,
                 lora_alpha: float, batch: dict[str, np.ndarray], head: dict[str, np.ndarray] | None = None):
    """The stepper of `backend`; `head`: dense tensors every step starts from (bench --adapter), else the model's."""
    if backend == "torch":
        return TorchStepper(model_dir, task, spec, targets, num_labels, lora_alpha, batch, head)
    return ArtifactStepper(backend, model_dir, task, artifacts_dir, spec, targets, lora_alpha, batch, head)
