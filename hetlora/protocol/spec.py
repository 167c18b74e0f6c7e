"""What an adapter for one base model looks like: adapted modules, their shapes, dense tensors.

Client and server derive the same `AdapterSpec` from the same base model and LoRA target list
(`hetlora.models.adapter_spec.derive_spec`); the server rejects any update that does not match it.
This module is pure Python so the wire format and validation need neither torch nor a server.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class LoRAModule:
    """A frozen linear layer `W0` (out x in) that receives `dW = B @ A`, A (r x in), B (out x r)."""

    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class AdapterSpec:
    """Module names and shapes of the adapter for one (base model, task, targets) triple.

    `modules`: adapted linear layers, keyed by their module name in the task model.
    `dense`: trainable tensors that are not LoRA (a new classification head), name -> shape.
    `model_hash`: fingerprint of the base model (config and weights) both sides must share.
    `pooling`: classification only: how the head's features are pooled (hetlora.models.pooling).
    """

    model_hash: str
    task: str
    targets: tuple[str, ...]
    modules: dict[str, LoRAModule]
    dense: dict[str, tuple[int, ...]] = field(default_factory=dict)
    pooling: str | None = None

    def to_json(self) -> dict:
        pooling = {"pooling": self.pooling} if self.pooling else {}
        return pooling | {
            "model_hash": self.model_hash,
            "task": self.task,
            "targets": list(self.targets),
            "modules": {m.name: [m.in_features, m.out_features] for m in self.modules.values()},
            "dense": {k: list(v) for k, v in self.dense.items()},
        }

    @classmethod
    def from_json(cls, doc: dict) -> "AdapterSpec":
        return cls(
            model_hash=doc["model_hash"],
            task=doc["task"],
            targets=tuple(doc["targets"]),
            modules={name: LoRAModule(name, int(i), int(o)) for name, (i, o) in doc["modules"].items()},
            dense={k: tuple(int(d) for d in v) for k, v in doc["dense"].items()},
            pooling=doc.get("pooling"),
        )

    @property
    def fingerprint(self) -> str:
        """Short hash of the whole spec: two parties with equal fingerprints agree on every name and shape."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    def lora_parameter_count(self, rank: int) -> int:
        """Parameters of the LoRA factors at `rank`: sum over modules of r * (in + out)."""
        return sum(rank * (m.in_features + m.out_features) for m in self.modules.values())

    def dense_parameter_count(self) -> int:
        total = 0
        for shape in self.dense.values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total


def linear_head(spec: AdapterSpec) -> tuple[str, str, int, int]:
    """(weight name, bias name, C, d) of the spec's linear classification head; ValueError when it has none."""
    weights = [n for n, s in spec.dense.items() if len(s) == 2]
    biases = [n for n, s in spec.dense.items() if len(s) == 1]
    if len(weights) != 1 or len(biases) != 1:
        raise ValueError(f"the head stages need one linear head (a weight and a bias), the spec has {sorted(spec.dense)}")
    num_labels, dim = spec.dense[weights[0]]
    return weights[0], biases[0], num_labels, dim
