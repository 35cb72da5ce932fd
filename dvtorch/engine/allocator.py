"""Keep freed activation buffers in the process instead of handing them back to the OS.

Why: a CPU forward of Inception-v3 on a batch of DeepVariant pileups allocates and frees
tens of MB of activations per layer. glibc's malloc serves blocks above its mmap threshold
(dynamic, at most 32 MiB) with fresh ``mmap`` calls and returns the top of the heap to the
OS above its trim threshold, so every forward touches new pages: thousands of minor page
faults per forward, each a kernel entry that zeroes a 4 KiB page, a visible share of the
forward's wall time. onnxruntime avoids the same cost with its own memory arena. Raising
both thresholds makes malloc reuse the freed memory: page faults per forward drop to about
zero and the process keeps its peak working set (it would reach it on the next batch).

The CPU engine's forwards run in worker threads (:mod:`dvtorch.engine.threads`), and glibc
gives each thread an arena of its own whose heaps are mmapped 64 MiB regions that the
thresholds above do not govern: a heap that becomes entirely free is unmapped at once, and
a block larger than a heap is always mmapped and unmapped again, so some processes settle
into re-faulting a heap on every forward. So two more settings: one arena for all threads
(``M_ARENA_MAX``: threads that start after this call share the main heap, which the
thresholds govern), and a 64 MiB top pad (``M_TOP_PAD``), which stops glibc from
unmapping a free heap in arenas that threads created before this call still use.
Figures: docs/performance.md.

This changes process-wide malloc settings, so nothing calls it on import: the CPU engine
(:class:`dvtorch.engine.cpu.CPUEngine`) calls it when built, and a Python user can call it
before their own inference loop (before the first forward, so that worker threads start on
the shared heap). It is a no-op (returning False) where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# glibc's mallopt() parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

#: Blocks up to this size come from the heap (reused after free) instead of fresh mmaps.
MMAP_THRESHOLD = 1 << 30
#: Free memory at the top of the heap is kept up to this size instead of being trimmed.
TRIM_THRESHOLD = (1 << 31) - 1
#: Threads that start later allocate from the main heap (the one the thresholds govern).
ARENA_MAX = 1
#: Free space kept in a thread arena's heaps: >= glibc's 64 MiB heap size, so a heap that
#: becomes entirely free is never unmapped (glibc keeps it when the pad exceeds the space
#: left in the heap before it).
TOP_PAD = 64 << 20

_DONE: bool | None = None


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    # musl and macOS have no gnu_get_libc_version (and a different or no mallopt).
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    return libc


def reuse_freed_memory() -> bool:
    """Set glibc's thresholds, top pad and arena count so freed buffers are reused (module doc).

    Idempotent; returns whether the settings are in effect.
    """
    global _DONE
    if _DONE is None:
        libc = _glibc()
        ok = False
        if libc is not None:
            libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            libc.mallopt.restype = ctypes.c_int
            ok = all([libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                      libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                      libc.mallopt(_M_TOP_PAD, TOP_PAD),
                      libc.mallopt(_M_ARENA_MAX, ARENA_MAX)])
        if not ok:
            log.debug("malloc thresholds unchanged (not glibc, or mallopt refused)")
        _DONE = ok
    return _DONE
