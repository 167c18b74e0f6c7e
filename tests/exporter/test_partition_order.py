"""exporter.partition_order: inside the block ExecuTorch's post-cut re-sort keeps the program's own nodes,
moves only what is out of place, and the original rebuild returns after."""

from __future__ import annotations

import torch
from executorch.exir import lowered_backend_module
from torch.fx import symbolic_trace

from exporter.partition_order import partitions_sorted_in_place


def chain(x, y):
    a = x + 1
    b = a * 2
    c = y - 3
    d = b + c
    return d * d


def out_of_order_module():
    """`b` (node `mul`) moved to just before the output, after its user `d` (`add_1`): what a partition cut leaves behind."""
    gm = symbolic_trace(chain)
    nodes = {node.name: node for node in gm.graph.nodes}
    gm.graph.output_node().prepend(nodes["mul"])
    return gm, nodes


def is_topological(graph) -> bool:
    seen = set()
    for node in graph.nodes:
        if any(source not in seen for source in node.all_input_nodes):
            return False
        seen.add(node)
    return True


def test_sorts_in_place_moving_only_what_is_out_of_order():
    gm, nodes = out_of_order_module()
    assert not is_topological(gm.graph)
    with partitions_sorted_in_place():
        assert lowered_backend_module.legalize_graph(gm) is gm
    assert is_topological(gm.graph)
    order = [node.name for node in gm.graph.nodes]
    assert order == ["x", "y", "add", "sub", "mul", "add_1", "mul_1", "output"]  # b back just before its user d
    assert {id(node) for node in gm.graph.nodes} == {id(node) for node in nodes.values()}  # the same nodes, not copies
    gm.recompile()
    x, y = torch.tensor([1.0, 2.0]), torch.tensor([5.0, 0.0])
    assert torch.equal(gm(x, y), chain(x, y))


def test_the_rebuild_returns_after_the_block():
    rebuild = lowered_backend_module.legalize_graph
    with partitions_sorted_in_place():
        assert lowered_backend_module.legalize_graph is not rebuild
    assert lowered_backend_module.legalize_graph is rebuild
    gm, nodes = out_of_order_module()
    rebuilt = lowered_backend_module.legalize_graph(gm)
    assert is_topological(rebuilt.graph) and nodes["x"] not in set(rebuilt.graph.nodes)  # copies outside the block
