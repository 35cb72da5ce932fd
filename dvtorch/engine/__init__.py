"""Engines: fast bulk inference beside the plain model.

The model (:class:`dvtorch.inception.DeepVariantInceptionV3`) stays a plain ``nn.Module``
for hook experiments. An engine takes a *snapshot* of its weights for one device and
dtype and runs batches of uint8 pixels, returning the softmax and the requested layers
pooled::

    engine = make_engine(model, ["mixed5", "mixed10"], pool="max", dtype="bf16")
    probs, acts = engine(pixels_uint8)          # acts["mixed5"]: [N, 768] float32

Only engine code knows about threads, allocators, oneDNN fusion, cuDNN flags and
``torch.compile``. A later weight edit or hook on the model is not seen by an engine built
before it: build a new one (engines refuse a model that carries hooks, so that a patch
meant for the experiment is never silently dropped).

* :class:`~dvtorch.engine.cpu.CPUEngine`: BN folded, oneDNN fused conv+bias+ReLU with
  pre-packed weights, one single-threaded forward per core (whole batches side by side
  when memory allows, else slices of each batch).
* :class:`~dvtorch.engine.cuda.CUDAEngine`: channels-last weights, fp32 / bf16 / fp16,
  cuDNN autotuning with TF32 off for fp32, optional ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from dvtorch.engine.base import Engine, Result, check_hookless
from dvtorch.hooks import check_pool, resolve_layers

#: dtype names used by the CLI and store.json.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

__all__ = ["DTYPES", "Engine", "Result", "make_engine"]


def make_engine(model: nn.Module, layers: Sequence[str], pool: str | None = "max", *,
                device: str | torch.device | None = None,
                dtype: str | torch.dtype | None = None, batch_size: int = 32,
                compile: bool = False, log: Callable[[str], None] | None = None) -> Engine:
    """The engine for ``device`` (default: where the model is) in ``dtype`` (default: the
    model's): ``engine(pixels) -> (probs, {layer: pooled})``.

    ``batch_size`` is the batch the CPU engine prepares for (other sizes stay correct).
    ``compile`` (CUDA only) runs the snapshot through ``torch.compile``. ``log`` gets one
    line when the engine chooses a slower way for a reason the user can change.
    """
    check_pool(pool)
    check_hookless(model)
    layers = list(layers)
    resolve_layers(model, layers)  # unknown or duplicate names fail before any work
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    dt = _dtype(dtype, model)
    if dev.type == "cpu":
        if compile:
            raise ValueError("compile=True is for CUDA engines; the CPU engine runs "
                             "oneDNN's fused kernels")
        if dt is torch.float16:
            raise ValueError("float16 runs on CUDA only; on a CPU bfloat16 is the fast "
                             "half precision")
        from dvtorch.engine.cpu import CPUEngine

        return CPUEngine(model, layers, pool, dtype=dt, batch_size=batch_size, log=log)
    if dev.type == "cuda":
        from dvtorch.engine.cuda import CUDAEngine

        return CUDAEngine(model, layers, pool, device=dev, dtype=dt, compile=compile)
    raise ValueError(f"no engine for device {dev}; use cpu or cuda")


def _dtype(dtype: str | torch.dtype | None, model: nn.Module) -> torch.dtype:
    if dtype is None:
        return next(model.parameters()).dtype
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype {dtype}: use torch.float32, bfloat16 or float16")
    return dtype
