"""ONNX Runtime training backend: trains from `training_model.onnx` / `eval_model.onnx` / `checkpoint`.

The training model returns the loss and accumulates the gradients of the trainable tensors; the
update runs in the client (ClientOptimizer) on the checkpoint's parameters, whose numpy views share
memory with the session. Intra-op threads follow torch's thread count. Needs `onnxruntime-training`
(x86_64, macOS, Windows; Android apps embed the Maven package with the same files).
"""

from __future__ import annotations

import numpy as np

from edge_client.backends.artifact_trainer import ArtifactTrainer
from edge_client.backends.artifacts import Artifact
from hetlora.errors import UserError


class OnnxEngine:
    """ORT training Module over one rank's artifacts."""

    def __init__(self, artifact: Artifact):
        import onnxruntime
        import torch
        from onnxruntime.training.api import CheckpointState, Module

        onnxruntime.set_default_logger_severity(3)
        self.rank = artifact.rank
        files = artifact.files
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self.state = CheckpointState.load_checkpoint(str(files["checkpoint"]))
        self.module = Module(str(files["training_model"]), self.state, str(files["eval_model"]),
                             session_options=options)
        parameters = self.state.parameters
        # views of the session's own buffers: stable across steps (the checkpoint owns them)
        self.params = {n: torch.from_numpy(parameters[n].data) for n in artifact.parameter_names}
        self.grads = {n: torch.from_numpy(parameters[n].grad) for n in artifact.parameter_names}
        self.module.train()

    def parameters(self):
        """Trainable tensors by artifact name, sharing memory with the session (in-place updates reach it)."""
        return self.params

    def forward_backward(self, inputs: list[np.ndarray]) -> list[float]:
        self.module.lazy_reset_grad()
        return [float(x) for x in self.module(*inputs)]

    def gradients(self):
        """Gradients of output 0 from the last forward_backward, by artifact name (views, overwritten next step)."""
        return self.grads

    def evaluate(self, inputs: list[np.ndarray]) -> list[float]:
        self.module.eval()
        try:
            return [float(x) for x in self.module(*inputs)]
        finally:
            self.module.train()


class OnnxTrainer(ArtifactTrainer):
    backend = "onnx"

    def open_engine(self, artifact: Artifact) -> OnnxEngine:
        try:
            return OnnxEngine(artifact)
        except ImportError:
            raise UserError("--backend onnx needs onnxruntime-training (pip install onnxruntime-training-cpu==1.19.2, "
                            "x86_64 only); use --backend torch or executorch") from None
