"""exporter.convex_partitions: the same partitions as ExecuTorch's GroupBasedPartitioner, from bitmasks.

Reference: executorch's generate_grouped_partitions_from_list_of_nodes on the same graph and groups.
"""

from __future__ import annotations

import operator

import pytest
import torch
from torch.fx import Graph, GraphModule

from exporter.convex_partitions import convex_partitions, reachability
from hetlora.errors import UserError


def reference_partitions(graph_module, groups):
    from executorch.exir.backend.canonical_partitioners.pattern_op_partitioner import (
        generate_grouped_partitions_from_list_of_nodes,
    )

    return generate_grouped_partitions_from_list_of_nodes(graph_module, [list(g) for g in groups])


def described(partitions) -> list[tuple[int, frozenset[str]]]:
    return sorted((p.id, frozenset(n.name for n in p.nodes)) for p in partitions)


def chain_graph():
    """x -> a -> b -> c -> out, and x -> d -> s -> t (independent of a, b, c), t a tuple read by getitem v."""
    graph = Graph()
    x = graph.placeholder("x")
    a = graph.call_function(torch.neg, (x,), name="a")
    b = graph.call_function(torch.sin, (a,), name="b")
    c = graph.call_function(torch.neg, (b,), name="c")
    d = graph.call_function(torch.cos, (x,), name="d")
    s = graph.call_function(torch.sin, (d,), name="s")
    t = graph.call_function(torch.sort, (s,), name="t")
    v = graph.call_function(operator.getitem, (t, 0), name="v")
    graph.output((c, v))
    return GraphModule(torch.nn.Module(), graph), {n.name: n for n in graph.nodes}


def test_reachability_bits():
    gm, n = chain_graph()
    nodes = list(gm.graph.nodes)
    down, up = reachability(nodes)
    pos = {node.name: i for i, node in enumerate(nodes)}
    assert down[pos["a"]] >> pos["c"] & 1 and not down[pos["a"]] >> pos["d"] & 1
    assert up[pos["c"]] >> pos["x"] & 1 and not up[pos["d"]] >> pos["a"] & 1


@pytest.mark.parametrize("groups, want", [
    # a and c cannot merge: the path a -> b -> c leaves through b (not partitioned) and comes back.
    ("a c", ["a", "c"]),
    # d is independent of a and c: it merges with c (the first partition in reverse order) but a cannot.
    ("a c d", ["a", "cd"]),
    # with b partitioned too, the chain is one partition
    ("a b c d", ["abcd"]),
    # {d, v} and {t} cannot merge (d -> s -> t); the getitem v then follows t, its tuple
    ("dv t", ["d", "tv"]),
])
def test_small_graph_matches_executorch(groups, want):
    gm, n = chain_graph()
    node_groups = [[n[name] for name in group] for group in groups.split()]
    ours = convex_partitions(gm, node_groups)
    assert sorted("".join(sorted(m.name for m in p.nodes)) for p in ours) == sorted(want)
    assert described(ours) == described(reference_partitions(gm, node_groups))


class Recorded(Exception):
    pass


def test_llama_joint_graph_matches_executorch(tiny_llama_dir, tmp_path, monkeypatch):
    """The tiny Llama's joint forward + backward edge graph, with the exporter's own XNNPACK groups."""
    import exporter.executorch_export as ee
    from exporter.training_graph import build_training_graph, example_inputs

    seen = {}

    def record(graph_module, groups):
        seen["ours"] = convex_partitions(graph_module, groups)
        seen["reference"] = reference_partitions(graph_module, groups)
        seen["groups"] = len(groups)
        raise Recorded  # the partitions are what is compared; no need to lower

    monkeypatch.setattr(ee, "convex_partitions", record)
    graph = build_training_graph(tiny_llama_dir, "causal-lm", 4, ("q_proj", "v_proj"), 16.0)
    inputs = example_inputs("causal-lm", 4, 2, 16, graph.model.config.vocab_size)
    with pytest.raises(UserError, match="Recorded"):
        ee.export_executorch(graph, inputs, tmp_path / "r4.pte", delegate="xnnpack", what="tiny", first=True)
    assert "ours" in seen
    assert len(seen["ours"]) < seen["groups"]  # groups were merged: the comparison is not vacuous
    assert described(seen["ours"]) == described(seen["reference"])


def test_memory_is_bits_per_node_pair_not_set_entries():
    """A 4,000-node chain: bitmasks take N^2/8 bytes a direction (4.2 MB peak measured here); ExecuTorch's
    reachability sets took 166 MB for half as many nodes, and grow with N^2."""
    import tracemalloc

    graph = Graph()
    node = graph.placeholder("x")
    chain = []
    for _ in range(4000):
        node = graph.call_function(torch.neg, (node,))
        chain.append(node)
    graph.output(node)
    gm = GraphModule(torch.nn.Module(), graph)
    groups = [[n] for n in chain[::10]]  # every tenth node: no two groups may merge (the chain leaves and returns)
    tracemalloc.start()
    partitions = convex_partitions(gm, groups)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(partitions) == len(groups)
    assert peak < 24 * 2**20
