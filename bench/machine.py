"""What the bench scripts print beside their figures: the CPU they were measured on.

Imported by the scripts as ``from machine import cpu_model`` (``python bench/NAME.py`` puts
``bench/`` first on ``sys.path``); torch-free, so the torch-free benches stay that way.
"""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` is often empty)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
