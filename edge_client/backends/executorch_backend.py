"""ExecuTorch backend: trains from a `.pte` holding the joint forward + backward graph of one rank,
with the frozen base weights in the `.ptd` file that all ranks share.

The program returns the loss and the gradients; the update runs in the client (ClientOptimizer) on
the parameters the runtime returns, which share memory with the program. The runtime's threadpool
(used by XNNPACK) is sized to torch's thread count before the program loads.
"""

from __future__ import annotations

import contextlib

import numpy as np

from edge_client.backends.artifact_trainer import ArtifactTrainer
from edge_client.backends.artifacts import Artifact
from hetlora.errors import UserError
from hetlora.output import native_stderr_filtered

METHOD = "forward"


class ExecuTorchEngine:
    def __init__(self, artifact: Artifact):
        import torch
        from executorch.extension.pybindings import portable_lib
        from executorch.extension.training import TrainingModule

        self.rank = artifact.rank
        self.program = artifact.files["program"]
        weights = artifact.files.get("weights")  # frozen weights shared by all ranks
        self._torch = torch
        with self._runtime("load"), native_stderr_filtered():
            if portable_lib._threadpool_get_thread_count() != torch.get_num_threads():
                portable_lib._unsafe_reset_threadpool(torch.get_num_threads())
            self.module = TrainingModule(portable_lib._load_for_executorch(
                str(self.program), data_path=str(weights) if weights else None))
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

    def parameters(self):
        """Trainable tensors by artifact name, sharing memory with the program (in-place updates reach it)."""
        return self.params

    def forward_backward(self, inputs: list[np.ndarray]) -> list[float]:
        with self._runtime("run"):
            outs = self.module.forward_backward(METHOD, [self._torch.from_numpy(np.asarray(x)) for x in inputs])
        return [float(x) for x in outs]

    def gradients(self):
        """Gradients of output 0 from the last forward_backward, by artifact name (fresh tensors)."""
        return self.module.named_gradients()

    def evaluate(self, inputs: list[np.ndarray]) -> list[float]:
        """The program has only the joint method: its gradients are computed and dropped."""
        return self.forward_backward(inputs)


class ExecuTorchTrainer(ArtifactTrainer):
    backend = "executorch"

    def open_engine(self, artifact: Artifact) -> ExecuTorchEngine:
        try:
            return ExecuTorchEngine(artifact)
        except ImportError:
            raise UserError("--backend executorch needs the executorch package (pip install executorch==1.5.1); "
                            "use --backend torch") from None
