"""What the machine can give this process, read without torch.

A shared basic (see docs/architecture.md, "Layers and import rules"): extraction's engine
sizes its batches in flight from it, and analysis refuses fits that would not fit from it,
so both must agree on one figure, and analysis must not import torch to get it.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["available_bytes", "usable_memory"]


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
    container or a batch-scheduler job. None where neither can be read (not Linux).

    Why the cgroup: on a large host with a small job limit, the host's figure lets work
    through that the job's OOM killer then ends.
    """
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


def usable_memory() -> int:
    """Bytes of RAM this process can use now, always a number: :func:`available_bytes`,
    else psutil's estimate (other systems, when installed), else the free pages sysconf
    reports."""
    found = available_bytes()
    if found is not None:
        return int(found)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
