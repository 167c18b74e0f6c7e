"""ExecuTorch backend: trains from a `.pte` holding the joint forward + backward graph of one rank,
with the frozen base weights in the `.ptd` file that all ranks share.

The program's method returns [user outputs, gradients, parameters]; two metadata methods give where
the gradients and the parameters start and a third their names. The update runs in the client
(ClientOptimizer) on the parameters, which share memory with the program (outputs not cloned).
The runtime's threadpool (used by XNNPACK) is sized to torch's thread count before the program loads.

The runtime extension is imported alone: executorch's Python wrappers (`portable_lib`,
`extension.training.TrainingModule`) import the exporter (executorch.exir, torch._dynamo, torchao)
for a warning class, +135 MB resident and about 8 s of start-up on the 2-core build machine.
"""

from __future__ import annotations

import contextlib

import numpy as np

from edge_client.backends.artifact_trainer import ArtifactTrainer
from edge_client.backends.artifacts import Artifact
from hetlora.errors import UserError
from hetlora.output import native_stderr_filtered

METHOD = "forward"
GRADIENTS_START, PARAMETERS_START, NAMES = (f"__et_training_{what}_{METHOD}"
                                            for what in ("gradients_index", "parameters_index", "fqn"))


class ExecuTorchEngine:
    def __init__(self, artifact: Artifact):
        import torch  # first: the extension resolves libtorch's symbols
        from executorch.extension.pybindings import _C as runtime

        self.rank = artifact.rank
        self.program = artifact.files["program"]
        weights = artifact.files.get("weights")  # frozen weights shared by all ranks
        self._torch = torch
        with self._runtime("load"), native_stderr_filtered():
            if runtime._threadpool_get_thread_count() != torch.get_num_threads():
                runtime._unsafe_reset_threadpool(torch.get_num_threads())
            self.module = runtime._load_for_executorch(str(self.program), data_path=str(weights) if weights else None)
            self._grads_at = self.module.run_method(GRADIENTS_START, ())[0]
            self._params_at = self.module.run_method(PARAMETERS_START, ())[0]
            self._names = list(self.module.run_method(NAMES, ()))
            # The parameters are outputs of a run: take them from one on zero inputs with prune_lambda 0
            # (gradients are discarded, weights untouched).
            outputs = self._run(self._zeros(artifact))
        self.params = dict(zip(self._names, outputs[self._params_at:]))

    def _run(self, inputs) -> list:
        outputs = self.module.run_method(METHOD, inputs, clone_outputs=False)
        self._grads = [g.clone() for g in outputs[self._grads_at:self._params_at]]
        return outputs

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
            outputs = self._run([self._torch.from_numpy(np.asarray(x)) for x in inputs])
        return [float(x) for x in outputs[:self._grads_at]]

    def gradients(self):
        """Gradients of output 0 from the last forward_backward, by artifact name (fresh tensors)."""
        return dict(zip(self._names, self._grads))

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
