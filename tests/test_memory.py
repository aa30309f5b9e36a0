"""elmm.memory: the heap trimmer hands freed heap memory back to the OS, and only when it grew."""

import ctypes

import pytest

from elmm.memory import HeapTrimmer, _malloc_trim, resident_mb

trimmer_available = HeapTrimmer().available
needs_glibc = pytest.mark.skipif(not trimmer_available, reason="needs glibc malloc_trim and /proc")


def _fragmented_heap(blocks: int = 96, size: int = 4 << 20) -> list:
    """Free `blocks` heap blocks of `size` bytes, each below a live small block, so no top trim frees them.

    Freeing one mmap-ed block raises glibc's mmap threshold above `size`, so the later blocks come from
    the heap; the pinned small block after each keeps freed blocks from merging into the heap's top.
    """
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.free(libc.malloc(size))  # raise the dynamic threshold
    ptrs, pins = [], []
    for _ in range(blocks):
        ptrs.append(libc.malloc(size))
        pins.append(libc.malloc(256 << 10))
        ctypes.memset(ptrs[-1], 1, size)  # make the pages resident
    for p in ptrs:
        libc.free(p)
    return [libc, pins]


@needs_glibc
def test_trimmer_returns_freed_heap_pages_once_growth_exceeds_the_slack():
    # Start from a heap with no free pages resident: free chunks that earlier tests left resident
    # could hold the new blocks, and touching them would not grow the resident set.
    _malloc_trim()(0)
    trimmer = HeapTrimmer(slack_mb=128)
    assert not trimmer.check()  # nothing grew yet
    before = resident_mb()
    keep = _fragmented_heap()  # 384 MB touched and freed, still resident
    grown = resident_mb()
    assert grown - before > 256, "glibc kept nothing resident: the fragmentation set-up no longer applies"
    assert trimmer.check()
    assert trimmer.trims == 1
    assert resident_mb() < before + 128  # the freed blocks went back
    assert not trimmer.check()  # and the base moved to what is left
    for pin in keep[1]:
        keep[0].free(pin)


@needs_glibc
def test_trimmer_below_the_slack_does_nothing():
    trimmer = HeapTrimmer(slack_mb=4096)
    _fragmented_heap(blocks=16)
    assert not trimmer.check()
    assert trimmer.trims == 0


def test_started_trimmer_stops_its_thread():
    trimmer = HeapTrimmer(interval_s=0.01).start()
    trimmer.stop()
    assert trimmer._thread is None
