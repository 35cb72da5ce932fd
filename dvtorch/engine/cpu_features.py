"""What the CPU can do for bf16 inference.

Why: ``--dtype bf16`` on CPU is much faster than float32 where the CPU has AVX-512 BF16,
and faster still with AMX. On an AVX-512 CPU with neither, oneDNN emulates bf16 arithmetic,
several times *slower* than float32. Below AVX-512, oneDNN has no bf16 convolution at all
and its fused conv op raises, so the CPU engine keeps ATen's plain (slow, correct) path.
Figures: docs/performance.md.
"""

from __future__ import annotations

import platform

import torch


def _probe(name: str, owner: object = torch.cpu) -> bool | None:
    """One of torch's private feature probes (``torch.cpu._is_*_supported`` by default);
    None where this torch build has no such probe or it fails."""
    probe = getattr(owner, name, None)
    if not callable(probe):
        return None
    try:
        return bool(probe())
    except RuntimeError:
        return None


def native_bf16() -> bool | None:
    """True if the CPU computes bf16 natively (AVX-512 BF16 or AMX tiles), False if not,
    None if this torch build cannot tell (then nobody should be warned on a guess)."""
    found = [_probe(name) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return None if None in found else any(found)


def mkldnn_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions on this CPU (natively or emulated on AVX-512).

    Honours ``ONEDNN_MAX_CPU_ISA``; False where torch has no oneDNN or cannot tell.
    """
    return torch.backends.mkldnn.is_available() \
        and bool(_probe("_is_mkldnn_bf16_supported", torch.ops.mkldnn))


def describe() -> str:
    """One line naming the CPU and its bf16 support, for benchmark headers (figures are only
    meaningful with the machine they were measured on)."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = {label: _probe(name)
             for label, name in (("avx512", "_is_avx512_supported"),
                                 ("avx512_bf16", "_is_avx512_bf16_supported"),
                                 ("amx", "_is_amx_tile_supported"))}
    known = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items() if v is not None)
    return f"cpu: {name} ({known or 'features unknown'})"
