"""How much memory a CPU forward needs, and how much the machine can give it.

Why: CPU extraction runs one whole batch per compute thread at once
(:func:`dvtorch.parallel.submit_whole`), so its activations take ``threads x batch``
examples' worth of memory instead of ``batch``: +0.5 GB peak RSS for six layers at batch
64 on 2 threads (measured), and on a 16-thread machine with the default batch of 64, ~6 GB
(estimated). Extraction only runs that way
when it fits comfortably (see :func:`whole_batches_fit`) and splits each batch across the
threads otherwise, which is slower but needs one batch's worth.
"""

from __future__ import annotations

from pathlib import Path

# Peak live activations of one example's forward, in elements per input pixel (H x W).
# Measured as the growth of peak RSS between single-threaded forwards of 16, 64 and 128
# examples of 100 x 221 pileups (six captured layers; glibc told to reuse freed memory):
# 4.3-5.2 MB per example in fp32 (49-59 elements per pixel), about half in bf16. The stem's
# 32-64 channel maps at half the input's resolution dominate, so it scales with H x W.
ACTIVATION_ELEMENTS_PER_PIXEL = 64
# whole batches in flight may take at most this share of the memory available at start
IN_FLIGHT_SHARE = 0.25


def activation_bytes_per_example(input_shape: tuple[int, int, int], element_size: int) -> int:
    """Peak activation memory of one example in a forward (an upper estimate, see above)."""
    h, w, _ = input_shape
    return ACTIVATION_ELEMENTS_PER_PIXEL * h * w * element_size


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) -> None


def _meminfo_available(meminfo: Path) -> int | None:
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_bytes(root: Path = Path("/")) -> int | None:
    """Memory this process can still use: the kernel's MemAvailable, lowered to what a
    cgroup limit (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``) leaves, as in a
    container or a batch-scheduler job. None where neither can be read (not Linux)."""
    found = []
    avail = _meminfo_available(root / "proc/meminfo")
    if avail is not None:
        found.append(avail)
    for limit_file, usage_file in (("sys/fs/cgroup/memory.max", "sys/fs/cgroup/memory.current"),
                                   ("sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(root / limit_file), _read_int(root / usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:  # v1: "no limit" is huge
            found.append(max(0, limit - usage))
            break
    return min(found) if found else None


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
