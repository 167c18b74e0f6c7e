"""ExecuTorch training program for one rank: the joint forward + backward graph in a `.pte`.

torch.export -> _export_forward_backward (gradients of output 0 for every parameter with
requires_grad) -> graph rewrites (exporter/graph_passes.py) -> edge dialect, delegating to XNNPACK
(default) or on ExecuTorch's CPU kernels alone ("portable") -> ExecuTorch program.

XNNPACK takes the matmuls against frozen base weights (forward `linear(x, W)` and backward `mm(g, W)`,
weights prepacked once at load) plus permute, bmm, gelu and softmax. It must never take a trainable
weight as a static one: XNNPACK packs static weights at load, so SGD updates to them would be ignored.
The matmuls against LoRA factors and the head stay on the CPU kernels. XNNPACK's full operator set
fails to lower the joint graph ("Output node ... is already in the inputs": a partition passes a
value straight through), so the operator set below is an explicit list.
"""

from __future__ import annotations

from pathlib import Path

from exporter.errors import export_error
from exporter.graph_passes import drop_inverse_permutes, frozen_parameters, rewrite_empty_permuted, split_addmm
from exporter.training_graph import TrainingGraph

XNNPACK_OPERATOR_CONFIGS = ("PermuteConfig", "BMMConfig", "GeluConfig", "SoftmaxConfig")


def frozen_weight_partitioner(frozen_names: set[str]):
    """An XnnpackPartitioner for gemms whose weight (arg 1) is a frozen parameter, plus the operator configs."""
    from executorch.backends.xnnpack.partition.config import generic_node_configs
    from executorch.backends.xnnpack.partition.config.gemm_configs import GEMMConfig, LinearConfig, MMConfig
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    def is_frozen_weight(node) -> bool:
        weight = node.args[1]
        return getattr(weight, "op", None) == "placeholder" and weight.name in frozen_names

    class FrozenWeightLinearConfig(LinearConfig):
        def check_constraints(self, node, ep) -> bool:
            return is_frozen_weight(node) and super().check_constraints(node, ep)

    class FrozenWeightMMConfig(MMConfig):
        def check_constraints(self, node, ep) -> bool:
            return is_frozen_weight(node) and super().check_constraints(node, ep)

        def get_deps(self, node, ep):
            # MMConfig looks for the nn.Linear source partition first; a backward mm(g, W) carries the
            # linear's source metadata but is not that linear, so take the node as it is.
            return GEMMConfig.get_deps(self, node, ep)

    operators = [getattr(generic_node_configs, name) for name in XNNPACK_OPERATOR_CONFIGS]
    return XnnpackPartitioner(configs=[FrozenWeightLinearConfig, FrozenWeightMMConfig, *operators])


def export_executorch(graph: TrainingGraph, inputs: tuple, path: Path, *, delegate: str, what: str) -> dict[str, Path]:
    """Write the `.pte` for `graph` at `path`; returns {"program": path}."""
    from executorch.exir import EdgeCompileConfig, to_edge, to_edge_transform_and_lower
    from torch.export import export
    from torch.export.experimental import _export_forward_backward

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        joint = _export_forward_backward(export(graph, inputs, strict=False))
        rewrite_empty_permuted(joint)
        drop_inverse_permutes(joint)
        config = EdgeCompileConfig(_check_ir_validity=True)
        if delegate == "xnnpack":
            frozen = frozen_parameters(joint)
            split_addmm(joint, linearize=frozen)
            partitioner = frozen_weight_partitioner({node.name for node in frozen})
            edge = to_edge_transform_and_lower(joint, partitioner=[partitioner], compile_config=config)
        else:
            split_addmm(joint)
            edge = to_edge(joint, compile_config=config)
        program = edge.to_executorch()
    except Exception as exc:  # torch.export / exir raise many types; all mean "cannot export"
        raise export_error("ExecuTorch", what, exc) from None
    path.write_bytes(program.buffer)
    return {"program": path}
