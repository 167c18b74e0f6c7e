"""ONNX Runtime training artifacts for one rank: training and eval models + checkpoint, no optimizer model
(the device runs the plan's optimiser on the gradients the training model returns).

Pinned facts (docs/EXPORT.md): onnx 1.17 (IR <= 10), the legacy TorchScript exporter
(dynamo=False) in TrainingMode.TRAINING with constant folding off, opset 14 (the
LayerNormalization gradient builder fails at 17), attention_mask passed explicitly.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from exporter.errors import export_error
from hetlora.output import native_stderr_filtered, quiet_onnxruntime
from exporter.training_graph import INPUT_NAMES, OUTPUT_NAMES, TrainingGraph, trainable_names

OPSET = 14
FILES = {"training_model": "training_model.onnx", "eval_model": "eval_model.onnx", "checkpoint": "checkpoint"}


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


def export_onnx(graph: TrainingGraph, inputs: tuple, out_dir: Path, *, what: str) -> dict[str, Path]:
    """Write the ORT training files for `graph` into `out_dir`; returns role -> path."""
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
                loss=None, optimizer=None, artifact_directory=str(out_dir))
    except Exception as exc:  # the exporters raise many types; all mean "this model cannot be exported"
        raise export_error("ONNX Runtime training", what, exc) from None
    finally:
        plain.unlink(missing_ok=True)
    return {role: out_dir / name for role, name in FILES.items()}
