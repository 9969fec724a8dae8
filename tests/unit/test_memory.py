"""Freed session memory goes back to the kernel (seng_fw.system.memory)."""

from __future__ import annotations

import subprocess
import sys

from seng_fw.system import memory

FRAGMENTED_HEAP = """
import ctypes
from seng_fw.system import memory
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
# Many small blocks with a live one behind each: free() alone cannot shrink the heap.
blocks, keep = [], []
for _ in range(2000):
    blocks.append(libc.malloc(50_000))
    ctypes.memset(blocks[-1], 1, 50_000)
    keep.append(libc.malloc(64))
for block in blocks:
    libc.free(block)
before = memory.rss_bytes()
assert memory.malloc_trim()
print(before - memory.rss_bytes())
"""


def test_malloc_trim_returns_freed_heap_memory() -> None:
    # In a fresh interpreter: this one's heap is whatever the other tests left.
    result = subprocess.run(
        [sys.executable, "-c", FRAGMENTED_HEAP], capture_output=True, text=True, check=True
    )
    assert int(result.stdout) > 50_000_000


def test_trimmer_waits_for_enough_released_sessions_and_time() -> None:
    trimmer = memory.Trimmer(min_released=10, min_interval=5.0)
    assert not trimmer.maybe_trim(5, now=0.0)
    assert trimmer.maybe_trim(10, now=0.0)
    assert not trimmer.maybe_trim(30, now=1.0)  # too soon
    assert trimmer.maybe_trim(30, now=6.0)
    assert not trimmer.maybe_trim(35, now=20.0)  # too few
    assert trimmer.trims == 2
