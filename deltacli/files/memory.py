"""Large buffers handed straight back to the operating system while streaming.

glibc serves big allocations with mmap and returns them on free — until the first such free,
after which it raises its mmap threshold to that size (up to 32 MiB) and serves the next
ones from its heap, which it rarely shrinks. A merge allocates and frees tensors of a few to
a few hundred MiB, one after another, so the heap's high-water mark, not the live tensors,
set its peak memory (`benchmarks/merge_memory.py`: a TIES merge of 3 LoRAs peaked at 1.56×
largest shard + deltas, 1.19× with the threshold fixed). Fixing the threshold at 1 MiB keeps
every tensor-sized buffer an mmap of its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h
THRESHOLD = 1 << 20


@functools.cache
def return_large_buffers() -> bool:
    """Fix glibc's mmap threshold at 1 MiB for this process; False where the C library is
    not glibc (nothing to do there)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): no mallopt
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD))
