"""Batch-split CPU inference: one single-threaded forward per worker thread on a slice of the batch.

With ``torch.get_num_threads() == n > 1`` PyTorch runs every operator as one OpenMP
parallel region of ``n`` threads with a barrier at its end: ~130 regions per Inception-v3
forward. oneDNN partitions each region statically, so a small conv (mixed8-10 are 4x12 and
1x5 maps) scales poorly, and when another process shares the cores every barrier waits for
a descheduled thread (a whole scheduler time slice, ~4-8 ms, i.e. *slower* than one
thread). onnxruntime's thread pool hands out blocks dynamically and degrades gracefully.

Running ``n`` independent single-threaded forwards on ``n`` slices of the batch has no
barrier inside the forward at all and keeps each oneDNN kernel on its efficient
single-thread path. Convolutions, pools and the head are all per-example, so the result is
the same tensor (bit-identical in practice) as the full-batch forward.

Forward hooks fire in the worker threads with slice outputs. A hook may opt in with
:func:`split_safe` and hand per-slice results to :func:`defer`; they are concatenated in
batch order and committed once the whole batch is done (``dvtorch.hooks.capture`` does
this). Any other hook on a submodule disables the split, so plain hooks keep seeing
full-batch tensors.

A caller with a stream of batches can do better than splitting each one:
:func:`submit_whole` runs a whole batch on one worker and returns at once, so that
``n`` batches compute side by side and the caller prepares the next meanwhile (what CPU
extraction does: +4.6 % fp32, +14.5 % bf16 over split batches; it costs ``n`` batches'
worth of activation memory, see :mod:`dvtorch.memory`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

_LOCAL = threading.local()
_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
_SAFE_ATTR = "_dvtorch_split_safe"


def _forget_pools_after_fork() -> None:
    # A forked child has the executors but not their threads: work submitted there would
    # wait forever. Start afresh (the parent's pools are untouched).
    global _POOLS_LOCK
    _POOLS.clear()
    _POOLS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_after_fork)

MIN_SLICE = 4  # examples per worker below which the split is not worth a thread hop


def split_safe(hook: Callable) -> Callable:
    """Mark a forward (pre-)hook as correct when called once per batch slice (see :func:`defer`)."""
    setattr(hook, _SAFE_ATTR, True)
    return hook


def in_worker() -> bool:
    """True inside a batch-split worker's forward."""
    return getattr(_LOCAL, "parts", None) is not None


def defer(key: Hashable, value: torch.Tensor, commit: Callable[[torch.Tensor], None]) -> bool:
    """Inside a split forward, keep ``value`` (a per-example ``[n, ...]`` slice result) and
    return True: after the batch, ``commit`` gets the slices concatenated in batch order.
    Outside one, return False (the caller commits ``value`` itself)."""
    parts = getattr(_LOCAL, "parts", None)
    if parts is None:
        return False
    parts[key] = (commit, value)
    return True


def global_forward_hooks() -> list[Callable]:
    """The forward (pre-)hooks registered for every module (``register_module_forward_hook``)."""
    from torch.nn.modules import module as _mod

    return [*getattr(_mod, "_global_forward_hooks", {}).values(),
            *getattr(_mod, "_global_forward_pre_hooks", {}).values()]


def forward_hooks(modules: Iterable[nn.Module]) -> Iterator[Callable]:
    """Every forward (pre-)hook registered on ``modules`` themselves."""
    for m in modules:
        yield from m._forward_hooks.values()
        yield from m._forward_pre_hooks.values()


def hooks_allow_split(modules: Iterable[nn.Module]) -> bool:
    """No global forward (pre-)hook, and none on ``modules`` that is not :func:`split_safe`."""
    return not global_forward_hooks() and all(getattr(h, _SAFE_ATTR, False)
                                              for h in forward_hooks(modules))


def split_ways(batch: int) -> int:
    """How many slices a CPU inference forward of ``batch`` examples should use (1: none)."""
    n = torch.get_num_threads()
    if n < 2 or in_worker():
        return 1
    return max(1, min(n, batch // MIN_SLICE))


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
    """The process's pool of ``n`` worker threads, each pinned to one compute thread (made
    on first use; the batch split and ``dvtorch.graph``'s whole-batch calls share it)."""
    with _POOLS_LOCK:
        pool = _POOLS.get(n)
        if pool is None:
            # torch.set_num_threads(1) in a worker also stores 1 as ATen's default for
            # threads created later; put the caller's value back once the workers exist.
            keep = torch.get_num_threads()
            pool = ThreadPoolExecutor(n, thread_name_prefix="dvtorch-split",
                                      initializer=_pin_one_thread)
            barrier = threading.Barrier(n)
            list(pool.map(lambda _: barrier.wait(), range(n)))  # start every worker now
            torch.set_num_threads(keep)
            _POOLS[n] = pool
        return pool


def _run_collecting(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                    inference: bool) -> tuple[torch.Tensor, dict]:
    """``fn(x)`` in this worker thread, and what its hooks handed to :func:`defer`."""
    _LOCAL.parts = {}
    try:
        with torch.inference_mode(inference), torch.no_grad():
            out = fn(x)
        return out, _LOCAL.parts
    finally:
        _LOCAL.parts = None


def run_split(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
              ways: int) -> torch.Tensor:
    """``fn(x)`` computed as ``ways`` single-threaded ``fn`` calls on dim-0 slices of ``x``.

    Only for inference (grad off); inference mode is carried into the workers.
    """
    inference = torch.is_inference_mode_enabled()
    slices = torch.tensor_split(x, ways, dim=0)
    results = list(worker_pool(ways).map(lambda xs: _run_collecting(fn, xs, inference),
                                         slices))
    first = results[0][1]
    for key, (commit, _) in first.items():
        commit(torch.cat([parts[key][1] for _, parts in results], 0))
    return torch.cat([out for out, _ in results], 0)


def whole_batch_depth(modules: Iterable[nn.Module]) -> int:
    """How many whole batches :func:`submit_whole` should run side by side: the compute
    threads, or 0 where that is not the way to run (one thread, already inside a worker,
    or a hook that is not :func:`split_safe` on ``modules``)."""
    n = torch.get_num_threads()
    if n < 2 or in_worker() or not hooks_allow_split(modules):
        return 0
    return n


def submit_whole(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                 depth: int) -> Callable[[], torch.Tensor]:
    """Start ``fn(x)`` on the whole batch in one of ``depth`` single-threaded workers and
    return at once; the returned getter waits for it, commits what its hooks handed to
    :func:`defer` (in the caller's thread) and returns the output.

    Why: with ``depth`` batches in flight, one per core, no core waits for the slower half
    of a split batch, nothing synchronises inside a forward, and the caller's thread is
    free meanwhile (extraction decodes the next batch). Call the getters in submission
    order when hooks commit into shared state (``dvtorch.hooks.capture`` keeps the last
    committed batch). Only for inference; inference mode is carried into the worker.
    """
    future = worker_pool(depth).submit(_run_collecting, fn, x,
                                       torch.is_inference_mode_enabled())

    def result() -> torch.Tensor:
        out, parts = future.result()
        for commit, value in parts.values():
            commit(value)
        return out

    return result
