"""Keep a stage's resident memory near what it actually holds.

glibc's malloc serves large blocks with mmap only below a threshold that it raises (up to 32 MB)
each time such a block is freed; above it, blocks come from the heap, and the freed parts of a heap
whose sizes keep changing (prompts of another length each batch, score rows of [batch x entities])
go back to the OS only when they lie at its top. At 14,541 entities an evaluate pass that holds about
1 GB grew to 1.7-11 GB resident from one run to the next with the same inputs.

`HeapTrimmer` watches the resident set from a daemon thread and calls `malloc_trim(0)`, which hands
free heap pages back to the OS, whenever the resident set has grown by more than `slack_mb` since
the last trim. So the bound is by construction (what is held + `slack_mb` + what one poll interval
can allocate), and a process that does not grow pays nothing. A fixed mmap threshold (1 MB) bounds it
too, but every large block then costs fresh page faults: 2.3x slower evaluation at 14,541 entities.
Measured in benchmarks/README.md ("Resident memory").

Where there is no glibc (macOS, musl) or no /proc, `start_heap_trimmer` returns None and nothing runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time

__all__ = ["HeapTrimmer", "start_heap_trimmer", "resident_mb"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_mb() -> float | None:
    """This process's resident set in MB (from /proc/self/statm), or None where there is no /proc."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except (OSError, IndexError, ValueError):
        return None


def _malloc_trim():
    """The C library's `malloc_trim` (glibc), or None where it has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


class HeapTrimmer:
    """Trim the malloc heap whenever the resident set grew by more than `slack_mb` since the last trim.

    `check()` is one poll (also callable directly); `start()` polls every `interval_s` from a daemon
    thread. `trims` and `seconds` say how often it acted and what that cost.
    """

    def __init__(self, slack_mb: float = 256, interval_s: float = 0.1) -> None:
        self.slack_mb, self.interval_s = slack_mb, interval_s
        self._trim = _malloc_trim()
        self._base = resident_mb()
        self.trims, self.seconds = 0, 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return self._trim is not None and self._base is not None

    def check(self) -> bool:
        """Trim if the resident set grew by more than `slack_mb`; True when it trimmed."""
        if not self.available:
            return False
        now = resident_mb()
        if now is None or now <= self._base + self.slack_mb:
            return False
        start = time.perf_counter()
        self._trim(0)  # ctypes releases the GIL for the call; malloc_trim takes the arenas' locks
        self.seconds += time.perf_counter() - start
        self.trims += 1
        # What is still resident after the trim is in use: grow from there.
        self._base = resident_mb() or now
        return True

    def start(self) -> HeapTrimmer:
        if self.available and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="heap-trimmer", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()


def start_heap_trimmer(slack_mb: float = 256, interval_s: float = 0.1) -> HeapTrimmer | None:
    """A started `HeapTrimmer`, or None where there is no glibc `malloc_trim` or no /proc."""
    trimmer = HeapTrimmer(slack_mb, interval_s)
    return trimmer.start() if trimmer.available else None
