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


def rewrite_empty_permuted(program) -> None:
    """Replace aten.empty_permuted (not core ATen; Llama's backward uses it) by empty + permute, in place.

    empty_permuted(size, layout) allocates sizes in `layout` order and views them back in logical order:
    empty([size[i] for i in layout]).permute(inverse(layout)).
    """
    aten = torch.ops.aten
    graph = program.graph_module.graph
    for node in list(graph.nodes):
        if node.target != aten.empty_permuted.default:
            continue
        size, layout = node.args[0], list(node.args[1])
        inverse = [layout.index(i) for i in range(len(layout))]
        with graph.inserting_before(node):
            physical = graph.call_function(aten.empty.memory_format, ([size[i] for i in layout],), dict(node.kwargs))
            physical.meta = dict(node.meta)
            logical = graph.call_function(aten.permute.default, (physical, inverse))
            logical.meta = dict(node.meta)
        node.replace_all_uses_with(logical)
        graph.erase_node(node)
    graph.lint()
    program.graph_module.recompile()


def export_executorch(graph: TrainingGraph, inputs: tuple, path: Path, *, delegate: str, what: str) -> dict[str, Path]:
    """Write the `.pte` for `graph` at `path`; returns {"program": path}."""
    from executorch.exir import EdgeCompileConfig, to_edge, to_edge_transform_and_lower
    from torch.export import export
    from torch.export.experimental import _export_forward_backward

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        joint = _export_forward_backward(export(graph, inputs, strict=False))
        rewrite_empty_permuted(joint)
        config = EdgeCompileConfig(_check_ir_validity=True)
        if delegate == "xnnpack":
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

            # The default partitioner groups ops into subgraphs that pass a forward activation straight through
            # to the backward ("Output node ... is already in the inputs"), which XNNPACK rejects; per-op
            # partitions lower. Lowering is slow (minutes for a 2-layer model): see docs/EXPORT.md.
            partitioner = XnnpackPartitioner(per_op_mode=True)
            edge = to_edge_transform_and_lower(joint, partitioner=[partitioner], compile_config=config)
        else:
            edge = to_edge(joint, compile_config=config)
        program = edge.to_executorch()
    except Exception as exc:  # torch.export / exir raise many types; all mean "cannot export"
        raise export_error("ExecuTorch", what, exc) from None
    path.write_bytes(program.buffer)
    return {"program": path}
