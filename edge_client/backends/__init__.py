"""Training backends behind one factory: torch (eager), onnx (ONNX Runtime training), executorch, auto.

Every trainer has `train_round(start, examples, cfg, *, rank, indices=None, mode=...) -> RoundResult`.
The artifact backends import only their runtime (onnxruntime / executorch), never the exporter.
"""

from __future__ import annotations

import logging

from hetlora.errors import UserError

log = logging.getLogger(__name__)
BACKENDS = ("torch", "onnx", "executorch", "auto")


def make_trainer(backend: str, *, model_dir, task: str, labels=None, targets=None, lora_alpha: float = 16.0,
                 artifacts_dir=None, rank: int | None = None, pooling: str | None = None):
    """The trainer for `backend`; `auto` picks one with edge_client.backends.select and logs why.

    `rank` (optional) loads and verifies the artifact of that rank now instead of at the first round.
    `pooling`: the run's classification pooling (artifacts also carry theirs in their spec fingerprint).
    """
    if backend == "auto":
        from edge_client.backends.select import choose_backend

        backend, reason = choose_backend(has_artifacts=artifacts_dir is not None)
        log.info("backend auto -> %s: %s", backend, reason)
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


def optimizer_settings(requested: str | None, trainer) -> dict:
    """The TrainingSettings optimiser fields of local rounds: an artifact trainer's own (`trainer.exported_optimizer`:
    the optimiser its artifacts were exported with and a baked-in weight decay) or, for the torch trainer (None),
    `requested` or adamw. UserError when `requested` is one the artifacts cannot run, so a client finds out
    before it registers."""
    fixed = trainer.exported_optimizer
    if fixed is None:
        return {"optimizer": requested or "adamw"}
    if requested not in (None, fixed["optimizer"]):
        raise UserError(f"--optimizer {requested}: the {trainer.backend} artifacts were exported to train with "
                        f"{fixed['optimizer']}; drop --optimizer, re-export, or use --backend torch")
    return dict(fixed)
