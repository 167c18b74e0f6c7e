"""ExecuTorch backend: trains from a `.pte` holding the joint forward + backward graph of one rank,
with the frozen base weights in the `.ptd` file that all ranks share.

ExecuTorch's training runtime offers SGD only (`get_sgd_optimizer`); the parameters it returns
share memory with the program, so loading weights is an in-place copy.
"""

from __future__ import annotations

import contextlib

import numpy as np

from edge_client.backends.artifact_trainer import ArtifactTrainer
from edge_client.backends.artifacts import Artifact
from hetlora.protocol.settings import TrainingSettings
from hetlora.errors import UserError

METHOD = "forward"


class ExecuTorchEngine:
    def __init__(self, artifact: Artifact):
        import torch
        from executorch.extension.pybindings.portable_lib import _load_for_executorch
        from executorch.extension.training import TrainingModule

        self.rank = artifact.rank
        self.program = artifact.files["program"]
        weights = artifact.files.get("weights")  # frozen weights shared by all ranks (absent in older exports)
        self._optimizer = None
        self._lr = None
        self._torch = torch
        with self._runtime("load"):
            self.module = TrainingModule(_load_for_executorch(str(self.program),
                                                              data_path=str(weights) if weights else None))
            # named_parameters() exists only after a first forward_backward: run one on zero inputs
            # with prune_lambda 0 (gradients are discarded, weights untouched).
            self.module.forward_backward(METHOD, self._zeros(artifact))
        self.params = self.module.named_parameters()

    @contextlib.contextmanager
    def _runtime(self, action: str):
        """The runtime's own errors (a kernel missing on this platform, a version mismatch) as one line."""
        try:
            yield
        except RuntimeError as exc:
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise UserError(f"the ExecuTorch runtime failed to {action} {self.program.name}: {first.strip()[:300]}; "
                            f"the executorch package must match the exporter's (executorch 1.5.1 with torch "
                            f"2.13.0), or train with --backend torch") from None

    def _zeros(self, artifact: Artifact):
        torch = self._torch
        shapes = artifact.input_shapes
        return (torch.zeros(shapes["input_ids"], dtype=torch.long), torch.ones(shapes["attention_mask"], dtype=torch.long),
                torch.zeros(shapes["labels"], dtype=torch.long), torch.zeros(self.rank), torch.zeros(self.rank),
                torch.tensor(0.0), torch.tensor(1.0))

    def read(self) -> dict[str, np.ndarray]:
        return {n: p.detach().numpy().copy() for n, p in self.params.items()}

    def write(self, values: dict[str, np.ndarray]) -> None:
        for name, value in values.items():
            self.params[name].copy_(self._torch.from_numpy(np.ascontiguousarray(value, np.float32)))

    def _run(self, inputs):
        with self._runtime("run"):
            outs = self.module.forward_backward(METHOD, [self._torch.from_numpy(np.asarray(x)) for x in inputs])
        return [float(x) for x in outs]

    def forward_backward(self, inputs: list[np.ndarray]) -> list[float]:
        return self._run(inputs)

    def gradients(self) -> dict[str, np.ndarray]:
        return {n: g.numpy().copy() for n, g in self.module.named_gradients().items()}

    def step(self, cfg: TrainingSettings) -> None:
        from executorch.extension.training import get_sgd_optimizer

        if self._optimizer is None or self._lr != (cfg.lr, cfg.weight_decay):
            self._optimizer = get_sgd_optimizer(self.params, cfg.lr, weight_decay=cfg.weight_decay)
            self._lr = (cfg.lr, cfg.weight_decay)
        self._optimizer.step(self.module.named_gradients())

    def evaluate(self, inputs: list[np.ndarray]) -> list[float]:
        """The program has only the joint method: its gradients are computed and dropped."""
        return self._run(inputs)


class ExecuTorchTrainer(ArtifactTrainer):
    backend = "executorch"

    def open_engine(self, artifact: Artifact) -> ExecuTorchEngine:
        try:
            return ExecuTorchEngine(artifact)
        except ImportError:
            raise UserError("--backend executorch needs the executorch package (pip install executorch==1.5.1); "
                            "use --backend torch") from None

    def check_config(self, artifact: Artifact, cfg: TrainingSettings) -> None:
        if cfg.optimizer != "sgd":
            raise UserError(f"the executorch backend trains with SGD only (ExecuTorch's training runtime has no "
                            f"{cfg.optimizer}); set the optimizer to sgd or use --backend torch/onnx")
