"""Worker threads for CPU engines, each pinned to one compute thread.

With ``torch.get_num_threads() == n > 1`` PyTorch runs every operator as one OpenMP
parallel region of ``n`` threads with a barrier at its end, about 130 regions per
Inception-v3 forward. oneDNN partitions each region statically, so the small late convs
(mixed8-10 maps are a few pixels wide) scale poorly, and when another process shares the
cores every barrier waits for a descheduled thread. Running ``n`` single-threaded
forwards side by side (on ``n`` slices of one batch, or on ``n`` whole batches) has no
barrier inside a forward and keeps each oneDNN kernel on its single-thread path. Every
layer is per example, so the results are the same tensors as one full-batch forward.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _forget_pools_after_fork() -> None:
    # A forked child has the executors but not their threads: work submitted there would
    # wait forever. Start afresh (the parent's pools are untouched).
    global _POOLS_LOCK
    _POOLS.clear()
    _POOLS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_after_fork)

#: Examples per worker below which splitting a batch is not worth a thread hop.
MIN_SLICE = 4


def split_ways(batch: int, threads: int) -> int:
    """How many slices a batch of ``batch`` examples is cut into for ``threads`` workers."""
    if threads < 2:
        return 1
    return max(1, min(threads, batch // MIN_SLICE))


def slice_sizes(batch: int, ways: int) -> list[int]:
    """Near-equal slice sizes, larger ones first (``torch.tensor_split`` order)."""
    q, r = divmod(batch, ways)
    return [q + (i < r) for i in range(ways)]


def _pin_one_thread() -> None:
    # OpenMP's thread count is per calling thread, but ATen re-reads its global default
    # on a thread's first parallel_for: run one now (while that default is 1) so this
    # worker keeps 1 thread after the caller's value is put back.
    torch.set_num_threads(1)
    torch.zeros(1 << 17).add_(1)


def worker_pool(n: int) -> ThreadPoolExecutor:
    """The process's pool of ``n`` worker threads, each pinned to one compute thread
    (made on first use and shared by every engine of the process)."""
    with _POOLS_LOCK:
        pool = _POOLS.get(n)
        if pool is None:
            # torch.set_num_threads(1) in a worker also stores 1 as ATen's default for
            # threads created later; put the caller's value back once the workers exist.
            keep = torch.get_num_threads()
            pool = ThreadPoolExecutor(n, thread_name_prefix="dvtorch-engine",
                                      initializer=_pin_one_thread)
            barrier = threading.Barrier(n)
            list(pool.map(lambda _: barrier.wait(), range(n)))  # start every worker now
            torch.set_num_threads(keep)
            _POOLS[n] = pool
        return pool
