"""exporter.fx_sources: no generated source is kept inside the block, the graph still runs, the cache returns after."""

from __future__ import annotations

import torch
from torch.fx import graph_module, symbolic_trace

from exporter.fx_sources import sources_not_kept


def double(x):
    return x * 2 + 1


def test_sources_not_kept_inside_and_kept_after():
    cache = graph_module._loader.eval_cache
    before = len(cache)
    with sources_not_kept():
        traced = symbolic_trace(double)
        traced.recompile()
        assert torch.equal(traced(torch.ones(3)), torch.full((3,), 3.0))
        assert len(cache) == before and len(graph_module._loader.eval_cache) == 0
    assert graph_module._loader.eval_cache is cache
    symbolic_trace(double).recompile()
    assert len(cache) > before  # outside the block torch.fx keeps its sources as before
