"""torch.fx keeps the Python source of every graph it compiles (for tracebacks) and never drops it.

ExecuTorch's lowering recompiles the whole program once per delegate partition (legalize_graph after it
fuses each partition), so each partition kept one more copy of the program's source: about 3.6 MB for
SmolLM2-135M's 23,679-node joint graph, some 6 GB over its 1,687 partitions. Inside `sources_not_kept()`
new sources are not stored: a traceback through generated code shows no source line; nothing else changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class _Discard(dict):
    """A cache that keeps nothing."""

    def __setitem__(self, key, value) -> None:
        pass


@contextlib.contextmanager
def sources_not_kept() -> Iterator[None]:
    """Within the block, torch.fx stores no generated source; the cache it had is restored after."""
    from torch.fx import graph_module

    loader = graph_module._loader
    kept, loader.eval_cache = loader.eval_cache, _Discard()
    try:
        yield
    finally:
        loader.eval_cache = kept
