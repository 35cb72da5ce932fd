"""The CUDA engine: BN folded, channels-last weights, fp32 / bf16 / fp16, optional
``torch.compile``.

Batches run in the caller's thread; CUDA kernels are asynchronous, so a caller that takes
a batch's result after starting the next one (``ahead = 1``) overlaps the host work of
one batch with the device's forward of the other. cuDNN settings are set around each
forward and restored afterwards: ``benchmark`` (every batch has one shape, so the kernel
search pays once) and, for fp32, TF32 off: PyTorch runs cuDNN convolutions in TF32 by
default, which rows recorded as float32 must not silently be.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from dvtorch.engine.base import Engine, Result, snapshot
from dvtorch.inception import fuse_batchnorm


class CUDAEngine(Engine):
    """See the module docstring."""

    name = "cuda"
    ahead = 1

    def __init__(self, model: nn.Module, layers: Sequence[str], pool: str | None, *,
                 device: torch.device, dtype: torch.dtype = torch.float32,
                 compile: bool = False):
        super().__init__(layers, pool)
        if not torch.cuda.is_available():
            raise ValueError(f"device {device}: torch sees no CUDA device")
        self.device = device
        self.dtype = dtype
        self.compiled = compile
        # BN folded in float32, then cast: what autocast of the folded model computes.
        fast = fuse_batchnorm(snapshot(model)).to(device=device, dtype=dtype)
        self._model = fast.to(memory_format=torch.channels_last)
        self._install_captures(self._model)
        self._run = torch.compile(self._model) if compile else self._model

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "device": str(self.device), "compile": self.compiled}

    def submit(self, pixels: torch.Tensor) -> Callable[[], Result]:
        c = torch.backends.cudnn
        with c.flags(enabled=c.enabled, benchmark=True, deterministic=c.deterministic,
                     allow_tf32=self.dtype is not torch.float32):
            result = self._forward(self._run, pixels.to(self.device, non_blocking=True))
        return lambda: result
