"""Hand freed heap memory back to the operating system after a runtime's program is dropped.

glibc keeps freed blocks inside the process for reuse, so a tier change that drops one rank's program and
loads another can hold the old one's memory next to the new one's. `malloc_trim(0)` releases it. C
libraries without that call (macOS, Android's bionic, musl) get nothing done.
"""

from __future__ import annotations

import ctypes


def return_freed_memory() -> bool:
    """malloc_trim(0) where the C library has it; True when memory went back to the system."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    return bool(trim(0))
