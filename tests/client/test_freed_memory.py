"""edge_client.backends.freed_memory: freed heap blocks go back to the system (glibc, as on CI and Linux boards)."""

from __future__ import annotations

import os
import sys

import psutil
import pytest

from edge_client.backends.freed_memory import return_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_holes_left_by_freed_blocks_leave_the_process():
    process = psutil.Process()
    blocks = [os.urandom(1) * (64 * 1024) for _ in range(1000)]  # 64 KB each: heap, below glibc's mmap threshold
    kept = blocks[::2]  # every other block stays, so the freed half is holes the heap cannot shrink past
    del blocks
    before = process.memory_info().rss
    assert return_freed_memory() is True
    released = before - process.memory_info().rss
    assert released >= 16 * 2**20, f"only {released / 2**20:.1f} MB of the 32 MB freed went back"
    assert len(kept) == 500
