"""ONNX Runtime training backend: trains from one rank's `training_model.onnx` / `eval_model.onnx`, its nominal
`checkpoint` (names and shapes only), filled from `initial.safetensors` (the trainable tensors, and the
session's parameter order) and the frozen weights that every rank shares (exporter/onnx_export.py).

The training model returns the loss and accumulates the gradients of the trainable tensors; the
update runs in the client (ClientOptimizer) on the checkpoint's parameters, whose numpy views share
memory with the session. Intra-op threads follow torch's thread count. Needs `onnxruntime-training`
(x86_64, macOS, Windows; Android apps embed the Maven package with the same files).
"""

from __future__ import annotations

import json

import numpy as np

from edge_client.backends.artifact_trainer import ArtifactTrainer
from edge_client.backends.artifacts import Artifact
from hetlora.errors import UserError


class OnnxEngine:
    """ORT training Module over one rank's artifacts."""

    def __init__(self, artifact: Artifact, *, profile_prefix: str | None = None):
        """`profile_prefix`: ORT writes its profile (JSON) to `<prefix>_<time>.json` when close() ends the sessions."""
        import onnxruntime
        import torch
        from onnxruntime.training.api import CheckpointState, Module

        onnxruntime.set_default_logger_severity(3)
        self.rank = artifact.rank
        files = artifact.files
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        # The CPU arena keeps one step's activations for the next: without it every step faults its
        # activations in afresh (SmolLM2 rank 8, batch 8 x 64: 310,000 page faults and 17% of the step on a
        # KVM Xeon). So the session holds its training peak between steps; a dropped session's memory goes back
        # to the system with malloc_trim on a tier change (ArtifactTrainer.engine_for; docs/EXPORT.md).
        options.enable_cpu_mem_arena = True
        if profile_prefix:
            options.enable_profiling, options.profile_file_prefix = True, profile_prefix
        self.state = CheckpointState.load_checkpoint(str(files["checkpoint"]))
        self.module = Module(str(files["training_model"]), self.state, str(files["eval_model"]),
                             session_options=options)
        fill_parameters(self.module, files["initial"], files["weights"])
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

    def close(self) -> None:
        """Destroy the sessions now, views of their memory first: only then does ORT write a profile."""
        self.params = self.grads = None
        self.module = self.state = None

    def evaluate(self, inputs: list[np.ndarray]) -> list[float]:
        self.module.eval()
        try:
            return [float(x) for x in self.module(*inputs)]
        finally:
            self.module.train()


def fill_parameters(module, initial, weights) -> None:
    """Every parameter of `module` (a nominal checkpoint's) from `initial` (trainable values; its metadata holds the
    session's parameter order) and the shared frozen `weights`, through one contiguous buffer, dropped after."""
    from onnxruntime import OrtValue
    from safetensors import safe_open

    buffer = np.empty(module.get_parameters_size(trainable_only=False), np.float32)
    offset = 0
    try:
        with safe_open(str(initial), "numpy") as own, safe_open(str(weights), "numpy") as shared:
            order = json.loads((own.metadata() or {})["parameter_order"])
            mine = set(own.keys())
            for name in order:
                value = (own if name in mine else shared).get_tensor(name).ravel()
                buffer[offset:offset + value.size] = value
                offset += value.size
    except (KeyError, ValueError, OSError) as exc:
        raise UserError(f"the onnx artifact's {initial.name} and {weights.name} do not fit together ({exc}); "
                        "copy the export folder to the device again") from None
    if offset != buffer.size:
        raise UserError(f"the onnx artifact's weights hold {offset} values, its model {buffer.size}; re-export")
    # the Python wrapper passes its argument through, so it takes the C-level OrtValue
    module.copy_buffer_to_parameters(OrtValue.ortvalue_from_numpy(buffer)._ortvalue, trainable_only=False)


class OnnxTrainer(ArtifactTrainer):
    backend = "onnx"

    def open_engine(self, artifact: Artifact) -> OnnxEngine:
        try:
            return OnnxEngine(artifact)
        except ImportError:
            raise UserError("--backend onnx needs onnxruntime-training (pip install onnxruntime-training-cpu==1.19.2, "
                            "x86_64 only); use --backend torch or executorch") from None
