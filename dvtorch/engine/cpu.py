"""The CPU engine: oneDNN fused kernels, one single-threaded forward per core.

Built from a snapshot of the model (:func:`dvtorch.engine.base.snapshot`):

* BatchNorm folded into the convs, weights cast to the engine's dtype and laid out
  channels-last (the NHWC input already is);
* each conv block replaced by :class:`FusedConvBN`: oneDNN's conv+bias+ReLU in one kernel
  with the weight pre-packed into oneDNN's blocked layout, its arguments resolved once;
  a pool branch convolves first and pools the (narrower) result;
* each max pool by :class:`FastMaxPool` (no int64 argmax indices);
* forwards on :mod:`dvtorch.engine.threads` workers, each on one compute thread: whole
  batches side by side when their activations fit in memory
  (:func:`dvtorch.engine.memory.whole_batches_fit`), else each batch cut into one slice per core.

Where this torch build lacks the fused op or it is not exact
(:func:`pointwise_conv_available`), or a bf16 engine runs on a CPU whose oneDNN has no
bf16 convolution, blocks keep the plain (BN-folded) path: slower, still correct. Every
replacement keeps its Keras name, so captures resolve as on the plain model. Figures:
docs/performance.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from dvtorch.engine import memory
from dvtorch.engine.allocator import reuse_freed_memory
from dvtorch.engine.base import Engine, Result, snapshot
from dvtorch.engine.cpu_features import mkldnn_bf16
from dvtorch.engine.threads import slice_sizes, split_ways, worker_pool
from dvtorch.inception import ConvBN, MaxPool, avg_pool_same, fuse_batchnorm


class _FusedArgs(NamedTuple):
    """oneDNN's fused conv op and its arguments, looked up once per block (in a forward
    of 94 convs, resolving attributes and overloads per call is a measurable share)."""

    op: Callable[..., torch.Tensor]
    weight: torch.Tensor  # pre-packed (oneDNN-blocked mkldnn tensor) or the conv weight
    bias: torch.Tensor
    padding: list[int]
    stride: list[int]
    dilation: list[int]
    groups: int


class FusedConvBN(nn.Module):
    """A BN-folded conv block as one oneDNN conv+bias+ReLU kernel (inference only)."""

    def __init__(self, block: ConvBN, input_size: list[int]):
        super().__init__()
        conv = block.conv
        self.pools_input = block.pools_input
        # Kept as a submodule so that the weights stay visible (state_dict, .to()).
        self.conv = conv
        packed = _pack_weight(conv, input_size)
        self._args = _FusedArgs(torch.ops.mkldnn._convolution_pointwise.default,
                                conv.weight if packed is None else packed, conv.bias,
                                list(conv.padding), list(conv.stride), list(conv.dilation),
                                conv.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self._args
        if self.pools_input:
            # conv1x1(avgpool(x)) + b == avgpool(conv1x1(x) + b): the pooling weights at
            # every position sum to 1 (padding is not averaged), and the conv's output has
            # fewer channels than its input, so pooling after it moves less memory.
            y = a.op(x, a.weight, a.bias, a.padding, a.stride, a.dilation, a.groups,
                     "none", [], "")
            return avg_pool_same(y).relu_()
        return a.op(x, a.weight, a.bias, a.padding, a.stride, a.dilation, a.groups,
                    "relu", [], "")


class FastMaxPool(MaxPool):
    """Keras's 3x3 / stride 2 'valid' max pool as four element-wise maxima over strided
    views (rows, then columns): ATen's max_pool2d also computes and allocates int64 argmax
    indices. Exactly the same values (inference only: no gradient routing)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2], x.shape[3]
        ho, wo = (h - 3) // 2 + 1, (w - 3) // 2 + 1
        rows = torch.maximum(x[:, :, 0:2 * ho - 1:2], x[:, :, 1:2 * ho:2])
        torch.maximum(rows, x[:, :, 2:2 * ho + 1:2], out=rows)
        out = torch.maximum(rows[..., 0:2 * wo - 1:2], rows[..., 1:2 * wo:2])
        torch.maximum(out, rows[..., 2:2 * wo + 1:2], out=out)
        return out


def pointwise_conv_available() -> bool:
    """Whether this torch build has oneDNN's fused conv+ReLU op and it gives exact results
    (checked once on a tiny conv against ATen), so an exotic build degrades to the plain
    path instead of producing wrong activations."""
    global _POINTWISE_OK
    if _POINTWISE_OK is None:
        _POINTWISE_OK = _check_pointwise_conv()
    return _POINTWISE_OK


_POINTWISE_OK: bool | None = None


def _check_pointwise_conv() -> bool:
    if not (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise")):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 5, 6, 7, generator=gen).contiguous(memory_format=torch.channels_last)
        conv = nn.Conv2d(5, 4, (1, 3), padding=(0, 1))
        with torch.no_grad():
            ref = torch.relu(conv(x))
            got = torch.ops.mkldnn._convolution_pointwise(
                x, conv.weight, conv.bias, [0, 1], [1, 1], [1, 1], 1, "relu", [], "")
        return bool(torch.allclose(got, ref, atol=1e-5, rtol=1e-5))
    except (RuntimeError, NotImplementedError):
        return False


def _pack_weight(conv: nn.Conv2d, input_size: list[int]) -> torch.Tensor | None:
    """oneDNN-blocked weight for ``input_size`` (None if this build cannot pack it)."""
    try:
        with torch.no_grad():
            return torch._C._nn.mkldnn_reorder_conv2d_weight(
                conv.weight.detach().to_mkldnn(), list(conv.padding), list(conv.stride),
                list(conv.dilation), conv.groups, input_size)
    except (RuntimeError, AttributeError):
        return None


def _conv_input_sizes(model: nn.Module, batch_size: int) -> dict[str, list[int]]:
    """NCHW input size of every conv block for a batch of ``batch_size``, by module path
    (one zero-input forward of batch 1; a meta-device forward would take seconds)."""
    sizes: dict[str, list[int]] = {}
    handles = []
    for path, block in model.named_modules():
        if isinstance(block, ConvBN):
            def pre(_m, args, path=path):
                sizes[path] = [batch_size, *args[0].shape[1:]]
            handles.append(block.conv.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            model(torch.zeros((1, *model.input_shape), dtype=torch.uint8))
    finally:
        for h in handles:
            h.remove()
    return sizes


def fused_model(model: nn.Module, dtype: torch.dtype, pack_batch: int) -> nn.Module:
    """The engine's private copy of ``model``: folded, cast, channels-last, fused."""
    fast = snapshot(model)
    fuse_batchnorm(fast)
    fast.to(dtype).to(memory_format=torch.channels_last)
    fused = pointwise_conv_available() and (dtype is not torch.bfloat16 or mkldnn_bf16())
    sizes = _conv_input_sizes(fast, pack_batch) if fused else {}
    for path, block in list(fast.named_modules()):
        if isinstance(block, ConvBN) and fused:
            fast.set_submodule(path, FusedConvBN(block, sizes[path]))
        elif isinstance(block, MaxPool):
            fast.set_submodule(path, FastMaxPool())
    fast.fused_conv = fused
    return fast


class CPUEngine(Engine):
    """See the module docstring. ``batch_size``: the batch the weights are packed for.
    ``whole_batches``: None decides by memory; False always splits each batch (one batch's
    worth of activations); True runs whole batches side by side regardless."""

    name = "cpu"

    def __init__(self, model: nn.Module, layers: Sequence[str], pool: str | None, *,
                 dtype: torch.dtype = torch.float32, batch_size: int = 32,
                 whole_batches: bool | None = None,
                 log: Callable[[str], None] | None = None):
        super().__init__(layers, pool)
        reuse_freed_memory()  # before the workers start, so they share the main heap
        self.threads = torch.get_num_threads()
        self.dtype = dtype
        self.depth = self._whole_batch_depth(model.input_shape, batch_size, log) \
            if whole_batches is None else (self.threads if whole_batches and self.threads > 1
                                           else 0)
        ways = split_ways(batch_size, self.threads) if not self.depth else 1
        self._model = fused_model(model, dtype, slice_sizes(batch_size, ways)[0])
        self._install_captures(self._model)
        self.ahead = self.depth + 1 if self.depth else 1
        if self.threads > 1:
            worker_pool(self.threads)  # start the workers now, not in the first batch

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "threads": self.threads,
                "whole_batches_in_flight": self.depth,
                "fused_conv": bool(self._model.fused_conv)}

    def submit(self, pixels: torch.Tensor) -> Callable[[], Result]:
        # The pool is looked up per batch: a forked child (loader processes) gets its own.
        if self.depth:
            future = worker_pool(self.threads).submit(self._forward, self._model, pixels)
            return future.result
        result = self._split(pixels) if self.threads > 1 else \
            self._forward(self._model, pixels)
        return lambda: result

    def _split(self, pixels: torch.Tensor) -> Result:
        """One batch cut into a slice per worker; results concatenated in batch order."""
        ways = split_ways(pixels.shape[0], self.threads)
        if ways < 2:
            return self._forward(self._model, pixels)
        parts = list(worker_pool(self.threads).map(lambda x: self._forward(self._model, x),
                                                   torch.tensor_split(pixels, ways)))
        probs = torch.cat([p for p, _ in parts])
        return probs, {n: torch.cat([a[n] for _, a in parts]) for n in self.layers}

    def _whole_batch_depth(self, shape: tuple[int, int, int], batch_size: int,
                           log: Callable[[str], None] | None) -> int:
        """Whole batches side by side (one per core) only where their activations take at
        most a share of the memory available; otherwise say so and split each batch."""
        if self.threads < 2:
            return 0
        size = torch.empty((), dtype=self.dtype).element_size()
        available = memory.available_bytes()
        fits, need = memory.whole_batches_fit(self.threads, batch_size, shape, size, available)
        if fits:
            return self.threads
        if log is not None:
            room = "unknown" if available is None else f"{available / 1e9:.1f} GB"
            largest = memory.largest_batch_that_fits(self.threads, shape, size, available)
            log(f"each batch is split across the {self.threads} compute threads: "
                f"{self.threads} whole batches of {batch_size} at once would need "
                f"~{need / 1e9:.1f} GB of activations, more than "
                f"{memory.IN_FLIGHT_SHARE:.0%} of the memory available ({room})"
                + (f"; --batch-size {largest} or less would fit (faster)"
                   if largest >= 1 else ""))
        return 0


__all__ = ["CPUEngine", "FastMaxPool", "FusedConvBN", "fused_model",
           "pointwise_conv_available"]
