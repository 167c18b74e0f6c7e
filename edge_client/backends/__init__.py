"""Training backends behind one factory: torch (eager), onnx (ONNX Runtime training), executorch, auto.

Every trainer has `train_round(start, examples, cfg, *, rank, indices=None, mode=...) -> RoundResult`.
The artifact backends import only their runtime (onnxruntime / executorch), never the exporter.
"""

from __future__ import annotations

import logging

from hetlora.errors import UserError
from edge_client.backends.select import choose_backend

log = logging.getLogger(__name__)
BACKENDS = ("torch", "onnx", "executorch", "auto")


def make_trainer(backend: str, *, model_dir, task: str, labels=None, targets=None, lora_alpha: float = 16.0,
                 artifacts_dir=None, rank: int | None = None, pooling: str | None = None):
    """The trainer for `backend`; `auto` picks one with edge_client.backends.select and logs why.

    `rank` (optional) loads and verifies the artifact of that rank now instead of at the first round.
    `pooling`: the run's classification pooling (artifacts also carry theirs in their spec fingerprint).
    """
    if backend == "auto":
        backend, reason = choose_backend(has_artifacts=artifacts_dir is not None)
        log.info("backend auto -> %s: %s", backend, reason)
    # The trainers are imported when one is made: every submodule's import (artifacts, select) runs this file.
    if backend == "torch":
        from edge_client.training import TorchTrainer

        return TorchTrainer(model_dir, task, labels=labels, targets=targets, lora_alpha=lora_alpha, pooling=pooling)
    if backend == "onnx":
        from edge_client.backends.onnx_backend import OnnxTrainer as cls
    elif backend == "executorch":
        from edge_client.backends.executorch_backend import ExecuTorchTrainer as cls
    else:
        raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    trainer = cls(model_dir, task, labels=labels, targets=targets, lora_alpha=lora_alpha, artifacts_dir=artifacts_dir,
                  pooling=pooling)
    if rank is not None:
        trainer.engine_for(rank)
    return trainer

