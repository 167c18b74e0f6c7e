"""ExecuTorch cuts each delegate partition out of the program, then rebuilds the whole program to restore
a topological order (`legalize_graph`: a copy of every node plus a recompile of the generated code).

That is one full rebuild per partition: about 2-3 s for SmolLM2-135M's 23,679-node training graph,
times 1,687 partitions, over an hour. After a cut only the new call node can be out of place, so inside
`partitions_sorted_in_place()` the program is sorted where it stands instead (torch's stable in-place
sort moves a node only when one of its inputs comes later). The order stays topological, which is all
the rebuild guaranteed; the generated code is refreshed once, when ExecuTorch builds the lowered program.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def partitions_sorted_in_place() -> Iterator[None]:
    """Within the block, ExecuTorch's partition cutting sorts the program in place instead of rebuilding it."""
    from executorch.exir import lowered_backend_module
    from torch._inductor.pattern_matcher import stable_topological_sort

    def sort_in_place(graph_module):
        stable_topological_sort(graph_module.graph)
        return graph_module

    rebuild, lowered_backend_module.legalize_graph = lowered_backend_module.legalize_graph, sort_in_place
    try:
        yield
    finally:
        lowered_backend_module.legalize_graph = rebuild
