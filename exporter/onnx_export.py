"""ONNX Runtime training artifacts for one rank, no optimizer model (the device runs the plan's optimiser on
the gradients the training model returns):

    onnx/r8/training_model.onnx, eval_model.onnx   the graphs
    onnx/r8/checkpoint                              ORT's nominal checkpoint (names and shapes, no values)
    onnx/r8/initial.safetensors                     the trainable tensors' initial values, and in its metadata
                                                    the session's parameter order ("parameter_order")
    onnx/frozen_weights.safetensors                 the frozen base weights, shared by every rank
A full ORT checkpoint holds every parameter, frozen ones too, so separate ranks could not share them;
the device fills the nominal checkpoint from the two safetensors files (edge_client.backends.onnx_backend).

Pinned facts (docs/EXPORT.md): onnx 1.17 (IR <= 10), the legacy TorchScript exporter
(dynamo=False) in TrainingMode.TRAINING with constant folding off, opset 14 (the
LayerNormalization gradient builder fails at 17), attention_mask passed explicitly.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from exporter.errors import export_error
from hetlora.output import native_stderr_filtered, quiet_onnxruntime
from exporter.training_graph import INPUT_NAMES, OUTPUT_NAMES, TrainingGraph, trainable_names
from exporter.shared_weights import keep_shared_file

OPSET = 14
FILES = {"training_model": "training_model.onnx", "eval_model": "eval_model.onnx", "checkpoint": "checkpoint",
         "initial": "initial.safetensors"}
SHARED = "frozen_weights.safetensors"


@contextmanager
def quiet_root_logger():
    """generate_artifacts logs every file it saves at INFO on the root logger; keep the progress bar readable."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def export_onnx(graph: TrainingGraph, inputs: tuple, out_dir: Path, *, what: str, first: bool) -> dict[str, Path]:
    """Write the ORT training files for `graph` into `out_dir` and the frozen weights beside it (`first`: this
    is the export's first rank, so an older shared file is replaced, not compared); returns role -> path."""
    import onnx
    from onnxruntime.training import artifacts

    quiet_onnxruntime()
    out_dir.mkdir(parents=True, exist_ok=True)
    plain = out_dir / "model.onnx"
    try:
        torch.onnx.export(graph, inputs, str(plain), input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                          opset_version=OPSET, dynamo=False, training=torch.onnx.TrainingMode.TRAINING,
                          do_constant_folding=False, export_params=True)
        model = onnx.load(str(plain))
        trainable = trainable_names(graph)
        initializers = [i.name for i in model.graph.initializer]
        missing = sorted(set(trainable) - set(initializers))
        if missing:
            raise RuntimeError(f"trainable parameters were folded away by the ONNX exporter: {missing[:3]}")
        with quiet_root_logger(), native_stderr_filtered():
            artifacts.generate_artifacts(
                model, requires_grad=trainable, frozen_params=[n for n in initializers if n not in set(trainable)],
                loss=None, optimizer=None, artifact_directory=str(out_dir), nominal_checkpoint=True)
        order = [i.name for i in onnx.load(str(out_dir / FILES["training_model"])).graph.input
                 if i.name in set(initializers)]
        weights = split_checkpoint(out_dir, order, set(trainable), first=first)
    except Exception as exc:  # the exporters raise many types; all mean "this model cannot be exported"
        raise export_error("ONNX Runtime training", what, exc) from None
    finally:
        plain.unlink(missing_ok=True)
    return {**{role: out_dir / name for role, name in FILES.items()}, "weights": weights}


def split_checkpoint(out_dir: Path, order: list[str], trainable: set[str], *, first: bool) -> Path:
    """Full checkpoint -> initial.safetensors (trainable values + the session's parameter `order`) and the
    shared frozen weights file; the nominal checkpoint becomes `checkpoint`. Returns the shared file."""
    from onnxruntime.training.api import CheckpointState
    from safetensors.numpy import save_file

    state = CheckpointState.load_checkpoint(str(out_dir / "checkpoint"))
    values = {name: np.array(state.parameters[name].data, copy=True) for name in order}
    del state
    save_file({n: v for n, v in values.items() if n in trainable}, str(out_dir / FILES["initial"]),
              metadata={"parameter_order": json.dumps(order)})
    fresh = out_dir / SHARED
    save_file({n: v for n, v in values.items() if n not in trainable}, str(fresh))
    os.replace(out_dir / "nominal_checkpoint", out_dir / FILES["checkpoint"])
    return keep_shared_file(fresh, out_dir.parent / SHARED, first=first)
