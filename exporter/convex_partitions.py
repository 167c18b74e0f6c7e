"""Merge XNNPACK's node groups into partitions, with each node's reachable nodes as one bitmask.

ExecuTorch's GroupBasedPartitioner (executorch 1.5) keeps, for every node of the graph, the Python
set of every node downstream and every node upstream of it, plus each partition's set of downstream
partitions: memory quadratic in the graph's size. On SmolLM2-135M's joint forward + backward graph
(23,410 nodes) the export was killed at 19.6 GB (docs/EXPORT.md). Here the same two relations are
one int per node whose bit j says "reaches node j" (N bits each), and the merge is the same greedy one:

    every group is a partition, numbered in reverse graph order; each partition in turn absorbs
    every later partition whose union with it stays convex (no path leaves the union and comes back);
    a getitem of a node whose users are all getitems joins that node's partition.

Convexity of a union C: no node outside C is both reachable from C and reaches C.
"""

from __future__ import annotations

import operator

from torch.fx import GraphModule, Node
from torch.fx.passes.infra.partitioner import Partition


def reachability(nodes: list[Node]) -> tuple[list[int], list[int]]:
    """(down, up): bit j of down[i] / up[i] is set when a path leads from node i to node j / from j to i."""
    index = {node: i for i, node in enumerate(nodes)}
    down = [0] * len(nodes)
    for i in range(len(nodes) - 1, -1, -1):
        for user in nodes[i].users:
            j = index[user]
            down[i] |= (1 << j) | down[j]
    up = [0] * len(nodes)
    for i, node in enumerate(nodes):
        for source in node.all_input_nodes:
            j = index[source]
            up[i] |= (1 << j) | up[j]
    return down, up


class _Part:
    """A partition under construction: its nodes, their bitmask and the nodes reachable from / reaching it."""

    def __init__(self, members: set[int], down: list[int], up: list[int]):
        self.members = members
        self.mask = sum(1 << i for i in members)
        self.down = self.up = 0
        for i in members:
            self.down |= down[i]
            self.up |= up[i]

    def can_absorb(self, other: _Part) -> bool:
        union = self.mask | other.mask
        return not ((self.down | other.down) & (self.up | other.up) & ~union)

    def absorb(self, other: _Part) -> None:
        self.members |= other.members
        self.mask |= other.mask
        self.down |= other.down
        self.up |= other.up


def convex_partitions(graph_module: GraphModule, groups: list[list[Node]]) -> list[Partition]:
    """Disjoint node groups -> the merged partitions, each convex, as ExecuTorch's partitioner infra takes them."""
    nodes = list(graph_module.graph.nodes)
    index = {node: i for i, node in enumerate(nodes)}
    down, up = reachability(nodes)
    # Partitions in reverse graph order of their last node, as GroupBasedPartitioner numbers them.
    ordered = sorted((sorted({index[n] for n in group}) for group in groups if group), key=lambda m: -m[-1])
    parts = [_Part(set(members), down, up) for members in ordered]
    del down, up
    merged: set[int] = set()
    for a, first in enumerate(parts):
        if a in merged:
            continue
        for b in range(a + 1, len(parts)):
            if b not in merged and first.can_absorb(parts[b]):
                first.absorb(parts[b])
                merged.add(b)
    owner = {}
    result = []
    for k, part in enumerate(parts):
        if k not in merged:
            partition = Partition(id=k, nodes=[nodes[i] for i in sorted(part.members)])
            owner.update(dict.fromkeys(partition.nodes, partition))
            result.append(partition)
    _pull_getitems(nodes, owner)
    return [p for p in result if p.size() > 0]


def _pull_getitems(nodes: list[Node], owner: dict[Node, Partition]) -> None:
    """A partitioned getitem of a node whose users are all getitems moves to that node's partition."""
    for node in nodes:
        home = owner.get(node)
        if home is None or not all(u.op == "call_function" and u.target is operator.getitem for u in node.users):
            continue
        for user in node.users:
            if user in owner and owner[user] is not home:
                owner[user].remove_node(user)
                home.add_node(user)
                owner[user] = home
