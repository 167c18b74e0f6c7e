"""ExecuTorch training program for one rank: the joint forward + backward graph in a `.pte`.

torch.export -> _export_forward_backward (gradients of output 0 for every parameter with
requires_grad) -> edge dialect, optionally delegating to XNNPACK -> ExecuTorch program.
"""

from __future__ import annotations

from pathlib import Path

import torch

from exporter.errors import export_error
from exporter.training_graph import TrainingGraph

DELEGATES = ("portable", "xnnpack")


def export_executorch(graph: TrainingGraph, inputs: tuple, path: Path, *, delegate: str, what: str) -> dict[str, Path]:
    """Write the `.pte` for `graph` at `path`; returns {"program": path}."""
    from executorch.exir import EdgeCompileConfig, to_edge, to_edge_transform_and_lower
    from torch.export import export
    from torch.export.experimental import _export_forward_backward

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        joint = _export_forward_backward(export(graph, inputs, strict=False))
        config = EdgeCompileConfig(_check_ir_validity=True)
        if delegate == "xnnpack":
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

            edge = to_edge_transform_and_lower(joint, partitioner=[XnnpackPartitioner()], compile_config=config)
        else:
            edge = to_edge(joint, compile_config=config)
        program = edge.to_executorch()
    except Exception as exc:  # torch.export / exir raise many types; all mean "cannot export"
        raise export_error("ExecuTorch", what, exc) from None
    path.write_bytes(program.buffer)
    return {"program": path}
