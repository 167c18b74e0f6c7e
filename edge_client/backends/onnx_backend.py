"""ONNX Runtime training backend: trains from `training_model.onnx` / `optimizer_model.onnx` / `checkpoint`.

AdamW with the hyperparameters baked into the optimizer model at export (the manifest lists them);
the learning rate is set per round from TrainingSettings. Needs `onnxruntime-training` (x86_64, macOS,
Windows; Android apps embed the Maven package with the same files).
"""

from __future__ import annotations

import numpy as np

from edge_client.backends.artifact_trainer import ArtifactTrainer
from edge_client.backends.artifacts import Artifact
from hetlora.protocol.settings import TrainingSettings
from hetlora.errors import UserError


class OnnxEngine:
    """ORT training Module + Optimizer over one rank's artifacts."""

    def __init__(self, artifact: Artifact):
        import onnxruntime
        from onnxruntime.training.api import CheckpointState, Module, Optimizer

        onnxruntime.set_default_logger_severity(3)
        self.rank = artifact.rank
        files = artifact.files
        self.state = CheckpointState.load_checkpoint(str(files["checkpoint"]))
        self.module = Module(str(files["training_model"]), self.state, str(files["eval_model"]))
        self.optimizer = Optimizer(str(files["optimizer_model"]), self.module)
        self.trainable = list(artifact.parameter_names)
        self.module.train()

    def read(self) -> dict[str, np.ndarray]:
        return {n: np.array(self.state.parameters[n].data, copy=True) for n in self.trainable}

    def write(self, values: dict[str, np.ndarray]) -> None:
        for name, value in values.items():
            self.state.parameters[name].data = np.ascontiguousarray(value, np.float32)

    def forward_backward(self, inputs: list[np.ndarray]) -> list[float]:
        self.module.lazy_reset_grad()
        return [float(x) for x in self.module(*inputs)]

    def gradients(self) -> dict[str, np.ndarray]:
        return {n: np.array(self.state.parameters[n].grad, copy=True) for n in self.trainable}

    def step(self, cfg: TrainingSettings) -> None:
        self.optimizer.set_learning_rate(cfg.lr)
        self.optimizer.step()

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

    def check_config(self, artifact: Artifact, cfg: TrainingSettings) -> None:
        baked = artifact.optimizer
        if cfg.optimizer != baked.get("name"):
            raise UserError(f"the onnx artifacts train with {baked.get('name')}, the run asks for {cfg.optimizer}; "
                            "use --backend torch or re-export")
        if float(cfg.weight_decay) != float(baked.get("weight_decay", 0.0)):
            raise UserError(f"the onnx optimizer model was exported with weight_decay {baked.get('weight_decay')}, "
                            f"the run asks for {cfg.weight_decay}; re-export with --weight-decay {cfg.weight_decay}")
