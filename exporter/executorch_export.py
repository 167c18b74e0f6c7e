"""ExecuTorch training program for one rank: the joint forward + backward graph in a `.pte`.

torch.export -> _export_forward_backward (gradients of output 0 for every parameter with
requires_grad) -> graph rewrites (exporter/graph_passes.py) -> edge dialect, delegating to XNNPACK
(default) or on ExecuTorch's CPU kernels alone ("portable") -> ExecuTorch program.

XNNPACK takes every matmul plus permute, bmm, gelu, softmax and sigmoid (SiLU's). Every right
operand of a matmul is a run-time input that XNNPACK packs per call, frozen base weights included:
a weight packed at load would be held once per layout, and a training step reads each frozen W in
two (forward `linear(x, W)`, backward `mm(g, W)`), two packed copies on top of the file's data.
Read in place, a frozen weight is resident once, as pages of the `.ptd` mapping; a trainable weight
is read fresh at every step by construction.

Frozen base weights go to one external data file, `executorch/frozen_weights.ptd`, shared by every
rank's program: their tensors and keys (parameter names) do not depend on the rank, so each rank's
export writes a byte-identical file and only the first is kept. The `.pte` keeps the graph, the
trainable LoRA factors and head, and the small buffers. XNNPACK's full operator set fails to lower
the joint graph ("Output node ... is already in the inputs": a partition passes a
value straight through), so the operator set below is an explicit list.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from exporter.column_blocks import Blocking, column_blocked
from exporter.convex_partitions import convex_partitions
from exporter.errors import export_error
from exporter.fx_sources import sources_not_kept
from exporter.partition_order import partitions_sorted_in_place
from exporter.shared_weights import keep_shared_file
from exporter.graph_passes import (drop_inverse_permutes, frozen_parameters, rewrite_empty_permuted,
                                   simplify_elementwise, split_addmm, split_long_contractions)
from exporter.training_graph import TrainingGraph

XNNPACK_OPERATOR_CONFIGS = ("PermuteConfig", "BMMConfig", "GeluConfig", "SoftmaxConfig", "MulConfig", "AddConfig",
                            "SubConfig", "ExpConfig", "SigmoidConfig")
WEIGHTS_TAG = "frozen_weights"  # -> frozen_weights.ptd


def training_partitioner():
    """An XnnpackPartitioner: every linear and mm, every right operand a run-time input, the operator configs.

    Its groups are merged by exporter/convex_partitions.py, not ExecuTorch's GroupBasedPartitioner, whose
    reachability sets are quadratic in the graph's size (over 19 GB for SmolLM2-135M).
    """
    from executorch.backends.xnnpack.partition.config import generic_node_configs
    from executorch.backends.xnnpack.partition.config.gemm_configs import GEMMConfig, LinearConfig, MMConfig
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    class NodeMMConfig(MMConfig):
        def get_deps(self, node, ep):
            # MMConfig looks for the nn.Linear source partition first; a backward mm(g, W) carries the
            # linear's source metadata but is not that linear, so take the node as it is.
            return GEMMConfig.get_deps(self, node, ep)

    class TrainingPartitioner(XnnpackPartitioner):
        def generate_partitions(self, ep):
            return convex_partitions(ep.graph_module, self.get_matched_nodes_from_configs(ep))

    operators = [getattr(generic_node_configs, name) for name in XNNPACK_OPERATOR_CONFIGS]
    return TrainingPartitioner(configs=[LinearConfig, NodeMMConfig, *operators],
                               force_non_static_weights_for_f32_linear=True)


def export_executorch(graph: TrainingGraph, inputs: tuple, path: Path, *, delegate: str, what: str,
                      first: bool, blocking: Blocking = Blocking()) -> dict[str, Path]:
    """Write the `.pte` for `graph` at `path` and the frozen weights beside it, shared by the ranks of one export.

    `first`: this is the export's first rank, so an older frozen_weights.ptd is replaced, not compared.
    `blocking`: which frozen linear maps an XNNPACK program computes in weight blocks (exporter/column_blocks.py).
    Returns {"program": path, "weights": path.parent / "frozen_weights.ptd"}.
    """
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge, to_edge_transform_and_lower
    from torch.export import export
    from torch.export.experimental import _export_forward_backward

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        blocked = column_blocked(graph.model, blocking) if delegate == "xnnpack" else contextlib.nullcontext()
        with sources_not_kept(), partitions_sorted_in_place(), blocked:  # the first two: lowering's cost per partition
            joint = _export_forward_backward(export(graph, inputs, strict=False))
            rewrite_empty_permuted(joint)
            drop_inverse_permutes(joint)
            simplify_elementwise(joint)
            frozen = frozen_parameters(joint)
            split_addmm(joint, linearize=frozen if delegate == "xnnpack" else frozenset())
            if delegate == "xnnpack":
                split_long_contractions(joint)
            frozen_names = {node.name for node in frozen}
            config = EdgeCompileConfig(_check_ir_validity=True)
            if delegate == "xnnpack":
                edge = to_edge_transform_and_lower(joint, partitioner=[training_partitioner()], compile_config=config)
            else:
                edge = to_edge(joint, compile_config=config)
            program = edge.to_executorch(ExecutorchBackendConfig(
                external_constants=lambda node: WEIGHTS_TAG if node.name in frozen_names else None))
    except Exception as exc:  # torch.export / exir raise many types; all mean "cannot export"
        raise export_error("ExecuTorch", what, exc) from None
    path.write_bytes(program.buffer)
    return {"program": path, "weights": keep_shared_weights(program, path.parent, first=first)}


def keep_shared_weights(program, folder: Path, *, first: bool) -> Path:
    """Write the program's frozen_weights.ptd into `folder` (first rank) or check it equals the one there."""
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        program.write_tensor_data_to_file(tmp)
        return keep_shared_file(Path(tmp) / f"{WEIGHTS_TAG}.ptd", folder / f"{WEIGHTS_TAG}.ptd", first=first)
