"""What the CPU can do for bf16 inference.

Why: ``--dtype bf16`` on CPU is 1.8-1.9x faster than float32 where the CPU has AVX-512 BF16
and 2.6-3x where it also has AMX (README, Performance), but on a CPU with neither, oneDNN
emulates bf16 arithmetic and the run is usually *slower* than float32. Users should hear
that before a long extraction, not after.
"""

from __future__ import annotations

import torch


def native_bf16() -> bool | None:
    """True if the CPU computes bf16 natively (AVX-512 BF16 or AMX tiles), False if not,
    None if this torch build cannot tell (then nobody should be warned on a guess)."""
    probes = [getattr(torch.cpu, name, None)
              for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if not all(callable(p) for p in probes):
        return None
    try:
        return any(bool(p()) for p in probes)
    except RuntimeError:
        return None
