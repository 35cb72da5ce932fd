"""How much memory a CPU forward needs, and whether whole batches may run per thread.

Why: the CPU engine runs one whole batch per compute thread at once
(:class:`dvtorch.engine.cpu.CPUEngine`), so its activations take ``threads x batch``
examples' worth of memory instead of ``batch``. It only runs that way when it fits
comfortably (see :func:`whole_batches_fit`) and splits each batch across the threads
otherwise, which is slower but needs one batch's worth. What the machine can give comes
from :mod:`dvtorch.system` (torch-free, shared with analysis); the measurements behind
:data:`ACTIVATION_ELEMENTS_PER_PIXEL` are in docs/performance.md.
"""

from __future__ import annotations

from dvtorch.system import available_bytes

__all__ = ["ACTIVATION_ELEMENTS_PER_PIXEL", "IN_FLIGHT_SHARE", "activation_bytes_per_example",
           "available_bytes", "largest_batch_that_fits", "whole_batches_fit"]

# Peak live activations of one example's forward, in elements per input pixel (H x W): an
# upper estimate of the measured growth of peak RSS per example (docs/performance.md). The
# stem's 32-64 channel maps at half the input's resolution dominate, so it scales with H x W.
ACTIVATION_ELEMENTS_PER_PIXEL = 64
# whole batches in flight may take at most this share of the memory available at start
IN_FLIGHT_SHARE = 0.25


def activation_bytes_per_example(input_shape: tuple[int, int, int], element_size: int) -> int:
    """Peak activation memory of one example in a forward (an upper estimate, see above)."""
    h, w, _ = input_shape
    return ACTIVATION_ELEMENTS_PER_PIXEL * h * w * element_size


def whole_batches_fit(depth: int, batch_size: int, input_shape: tuple[int, int, int],
                      element_size: int, available: int | None) -> tuple[bool, int]:
    """Whether ``depth`` whole batches of ``batch_size`` may compute at once, and the bytes
    they would take: yes if that is at most ``IN_FLIGHT_SHARE`` of ``available`` (when
    unknown: if it is no more than one batch split across the threads would take, i.e.
    never for ``depth`` > 1)."""
    need = depth * batch_size * activation_bytes_per_example(input_shape, element_size)
    if available is None:
        return depth <= 1, need
    return need <= IN_FLIGHT_SHARE * available, need


def largest_batch_that_fits(depth: int, input_shape: tuple[int, int, int], element_size: int,
                            available: int | None) -> int:
    """The largest batch size :func:`whole_batches_fit` accepts for ``depth`` whole
    batches (0: not even one example each, or ``available`` unknown)."""
    if available is None:
        return 0
    per_example = activation_bytes_per_example(input_shape, element_size)
    return int(IN_FLIGHT_SHARE * available / (depth * per_example))
