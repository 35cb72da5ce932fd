"""DeepVariant's Inception-v3 as a native PyTorch module, named like the Keras graph.

DeepVariant builds ``tf.keras.applications.InceptionV3(include_top=False, weights=None,
input_shape=(H, W, C), pooling='avg')`` followed by ``Dropout(0.2)`` and
``Dense(3, softmax, name='classification')``. This module reproduces that topology
exactly so that converted weights give the same numbers, and names every submodule after
the layer a *fresh* Keras session would create (``conv2d``, ``conv2d_1`` ... ``conv2d_93``,
``mixed0`` ... ``mixed10``) so that probing results can be read next to the DeepVariant
blog post and Keras code.

Layout decisions:

* The forward pass takes **NHWC** float32 like DeepVariant; ``x.permute(0, 3, 1, 2)`` is an
  NCHW view with channels-last strides (zero copy), which is also the fastest memory format
  for oneDNN / cuDNN convolutions.
* Keras ``conv2d_bn`` = Conv2D (no bias) -> BatchNormalization(scale=False, eps=1e-3) ->
  ReLU. The state dict keeps BN unfused (``beta``, ``running_mean``, ``running_var``) so it
  maps 1:1 to Keras variables; :func:`fuse_batchnorm` folds it into the conv for inference.
* Branch average pools are 3x3 / stride 1 / 'same' and TF leaves the padding out of the
  average, hence ``count_include_pad=False``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dvtorch import parallel
from dvtorch.cpu import mkldnn_bf16

BN_EPS = 1e-3  # Keras BatchNormalization default epsilon (DeepVariant keeps it).


class ScaleFreeBatchNorm(nn.Module):
    """Inference BatchNorm without gamma (Keras ``scale=False``): ``(x - mean) / sqrt(var + eps) + beta``.

    A dedicated module (instead of ``nn.BatchNorm2d`` with a frozen weight) keeps the state
    dict honest: exactly the three Keras variables, nothing that would need inventing on
    import.
    """

    def __init__(self, channels: int, eps: float = BN_EPS):
        super().__init__()
        self.eps = eps
        self.beta = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, None, self.beta,
                            False, 0.0, self.eps)


def _same_padding(kernel: tuple[int, int]) -> tuple[int, int]:
    """TF 'same' padding for stride 1 and odd kernels: symmetric ``k // 2`` on each side."""
    for k in kernel:
        if k % 2 != 1:
            raise ValueError(f"'same' padding is only symmetric for odd kernels, got {kernel}")
    return kernel[0] // 2, kernel[1] // 2


class ConvBN(nn.Module):
    """Keras ``conv2d_bn``: Conv2D (bias-free) -> BatchNorm(scale=False) -> ReLU.

    The module's output is the Keras ``activation_N`` tensor. After
    :func:`fuse_batchnorm` the conv carries a bias and ``bn`` becomes ``nn.Identity``.
    ``pools_input`` (the pool branches): the block also owns the 3x3 average pool before
    its 1x1 conv, so its forward pre-hooks see the unpooled block input.
    """

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int],
                 stride: int = 1, padding: str = "same", pools_input: bool = False):
        super().__init__()
        if pools_input and (tuple(kernel) != (1, 1) or stride != 1):
            raise ValueError("pools_input is only exact for a 1x1, stride-1 conv")
        if padding == "same":
            if stride != 1:
                raise ValueError("Inception-v3 only uses 'same' padding with stride 1")
            pad = _same_padding(kernel)
        elif padding == "valid":
            pad = (0, 0)
        else:
            raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=pad, bias=False)
        self.bn: nn.Module = ScaleFreeBatchNorm(cout)
        self.relu = nn.ReLU(inplace=True)
        # Set by optimize_for_inference(): one oneDNN conv+bias+ReLU kernel instead of a
        # conv followed by a separate, memory-bound ReLU pass (~20% of CPU time), with its
        # arguments resolved once (see _FusedConv); a plain attribute, never in state dicts.
        self._fused: _FusedConv | None = None
        # The pool branch of mixed0-2, 4-7, 9-10: Keras AveragePooling2D(3, 1, 'same') runs
        # on this block's input first (that pooling layer has no Keras name of its own).
        self.pools_input = pools_input

    @property
    def fused_relu(self) -> bool:
        """Whether optimize_for_inference() gave this block the fused oneDNN conv+ReLU."""
        return self._fused is not None

    def __getstate__(self) -> dict:
        """For ``copy.deepcopy`` / pickling: oneDNN's packed weight and op handle can be
        neither copied nor pickled, so the copy keeps only what to pack them for; it
        repacks from its own conv weight on its first fused forward (``_current_fused``)."""
        state = self.__dict__.copy()
        f = state.get("_fused")
        if f is not None:
            state["_fused"] = f._replace(op=None, weight=None, bias=None, source=None)
        return state

    def _children_hooked(self) -> bool:
        """Whether a user hook sits on the inner conv / bn / relu (then they must run)."""
        return any(m._forward_hooks or m._forward_pre_hooks
                   for m in (self.conv, self.bn, self.relu))

    def _current_fused(self) -> _FusedConv | None:
        """The fused op, repacked if the conv's weight was replaced or edited in place
        since it was packed (``load_state_dict``, an ablation under ``no_grad``): the
        packed copy would otherwise keep computing with the old weights."""
        f = self._fused
        w = self.conv.weight
        if f is not None and (w is not f.source or _version(w) != f.version
                              or w.data_ptr() != f.data_ptr):
            # (also a deep copy's or an unpickled model's first forward: source is None)
            f = self._fused = _fused_conv(self.conv, f.input_size)
        return f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self._fused
        # Traced graphs (dvtorch.graph) record the plain conv, bias and ReLU ops, which
        # oneDNN Graph fuses itself; the pre-packed weights would be frozen in as constants.
        if f is not None and x.dtype is f.dtype and x.is_cpu and not torch.is_grad_enabled() \
                and not torch.is_autocast_enabled("cpu") and not torch.jit.is_tracing() \
                and not self._children_hooked():
            f = self._current_fused()
            if self.pools_input:
                # conv1x1(avgpool(x)) + b == avgpool(conv1x1(x) + b): the pooling weights
                # at every position sum to 1 (padding is not averaged). Pooling the conv's
                # 32-192 output channels instead of its 192-2048 input channels: measured
                # +4% fp32, +10% bf16 per CPU forward; the ReLU runs in place afterwards.
                y = f.op(x, f.weight, f.bias, f.padding, f.stride, f.dilation, f.groups,
                         "none", [], "")
                return _avg_pool_same(y).relu_()
            return f.op(x, f.weight, f.bias, f.padding, f.stride, f.dilation, f.groups,
                        "relu", [], "")
        if self.pools_input:
            if torch.jit.is_tracing() and isinstance(self.bn, nn.Identity) \
                    and not torch.onnx.is_in_onnx_export():
                # A BN-folded model traced for dvtorch.graph: the fused path's conv-first
                # order (see above); measured +2% fp32, +4-5% bf16 per oneDNN Graph forward.
                # ONNX exports keep Keras's order: they stand in for tf2onnx's graph.
                return _avg_pool_same(self.conv(x)).relu_()
            x = _avg_pool_same(x)
        y = self.bn(self.conv(x))
        if isinstance(self.bn, nn.Identity) and (self.conv._forward_hooks
                                                 or self.bn._forward_hooks):
            # BN folded: y is the conv's own output, which a hook on the conv may keep;
            # the in-place ReLU would turn it into the block's output behind its back.
            y = y.clone()
        return self.relu(y)


class _FusedConv(NamedTuple):
    """oneDNN's fused conv+bias(+ReLU) op and its arguments, looked up once per block.

    Why: in a CPU forward each of the 94 convs costs 0.2-0.3 ms beyond its kernel; the
    Python share of that (module attribute lookups, argument lists, overload resolution,
    checks) is avoidable: resolving it once measured ~4 % of a bf16 forward at one thread.
    The fused op is inference-only, CPU-only and does not autocast, so ``forward`` takes
    the plain path with grad or autocast on, on another device, or for an input of another
    dtype than ``dtype`` (a model cast after optimize_for_inference).
    """

    op: Callable[..., torch.Tensor]
    weight: torch.Tensor  # pre-packed (oneDNN-blocked mkldnn tensor) or conv.weight itself
    bias: torch.Tensor
    padding: list[int]
    stride: list[int]
    dilation: list[int]
    groups: int
    dtype: torch.dtype
    # what ``weight`` was packed from: the parameter, its version counter and storage
    # (ConvBN repacks when any changes) and the input size it was packed for
    source: torch.Tensor
    version: int
    data_ptr: int
    input_size: list[int]


def scale_pixels(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """DeepVariant's input scaling ``(x - 128) / 128`` of uint8 pixels, in ``dtype``.

    Computed as ``-1 + x / 128`` in one pass over the uint8 pixels (``torch.add`` with a
    0-dim ``-1`` and ``alpha``; a cast, multiply and subtract took three passes over a
    32-bit or 16-bit copy, ~2 % of a bf16 CPU forward). Every step is exact for 0..255
    (powers of two; at most 8 significant bits), so float32 and bfloat16 give exactly
    DeepVariant's values. The 0-dim ``-1`` lives on the CPU whatever the images' device:
    PyTorch takes a 0-dim CPU tensor as a scalar in a CUDA op (no host-to-device copy per
    batch), and its dtype still sets the result's.
    """
    minus_one = torch.tensor(-1.0, dtype=dtype)
    return torch.add(minus_one, images, alpha=1.0 / 128.0)


def _avg_pool_same(x: torch.Tensor) -> torch.Tensor:
    """Keras ``AveragePooling2D((3, 3), strides=1, padding='same')``: padding not averaged."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _max_pool_valid(x: torch.Tensor) -> torch.Tensor:
    """Keras ``MaxPooling2D((3, 3), strides=(2, 2))`` ('valid').

    On CPU, four element-wise maxima over strided views (rows, then columns) instead of
    ATen's max_pool2d, which also computes and allocates int64 argmax indices: the same
    values exactly, ~30% less time for the four pools, 2-3% of a bf16 forward. Inputs that
    need gradients (ties would share the gradient instead of routing it to one argmax) and
    traced / compiled / exported graphs keep the single MaxPool op.
    """
    if x.device.type != "cpu" or x.dim() != 4 or x.requires_grad or torch.jit.is_tracing() \
            or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return F.max_pool2d(x, 3, stride=2)
    h, w = x.shape[2], x.shape[3]
    ho, wo = (h - 3) // 2 + 1, (w - 3) // 2 + 1
    rows = torch.maximum(x[:, :, 0:2 * ho - 1:2], x[:, :, 1:2 * ho:2])
    torch.maximum(rows, x[:, :, 2:2 * ho + 1:2], out=rows)
    out = torch.maximum(rows[..., 0:2 * wo - 1:2], rows[..., 1:2 * wo:2])
    torch.maximum(out, rows[..., 2:2 * wo + 1:2], out=out)
    return out


class _Namer:
    """Hands out Keras auto names in creation order (``conv2d``, ``conv2d_1``, ...)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __call__(self, base: str) -> str:
        i = self.counts.get(base, 0)
        self.counts[base] = i + 1
        return base if i == 0 else f"{base}_{i}"


class _Block(nn.Module):
    """A mixed block: children are ConvBN modules registered under their Keras names.

    ``conv(...)`` registers the next Keras-named conv block in creation order and returns
    its name; ``forward`` of each subclass looks children up by those recorded names.
    """

    def __init__(self, namer: _Namer):
        super().__init__()
        self._namer = namer

    def conv(self, cin: int, cout: int, kernel: tuple[int, int], stride: int = 1,
             padding: str = "same", pools_input: bool = False) -> ConvBN:
        name = self._namer("conv2d")
        block = ConvBN(cin, cout, kernel, stride, padding, pools_input)
        self.add_module(name, block)
        return block


class InceptionA(_Block):
    """mixed0-2 (35x35 grid in ImageNet): 1x1, 5x5, double 3x3 and avg-pool branches."""

    def __init__(self, namer: _Namer, cin: int, pool_features: int):
        super().__init__(namer)
        self.b1 = [self.conv(cin, 64, (1, 1))]
        self.b5 = [self.conv(cin, 48, (1, 1)), self.conv(48, 64, (5, 5))]
        self.b3 = [self.conv(cin, 64, (1, 1)), self.conv(64, 96, (3, 3)),
                   self.conv(96, 96, (3, 3))]
        self.bp = [self.conv(cin, pool_features, (1, 1), pools_input=True)]
        self.out_channels = 64 + 64 + 96 + pool_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([_seq(self.b1, x), _seq(self.b5, x), _seq(self.b3, x),
                          _seq(self.bp, x)], 1)


class InceptionB(_Block):
    """mixed3: grid reduction with a strided 3x3, a strided double 3x3 and a max pool."""

    def __init__(self, namer: _Namer, cin: int):
        super().__init__(namer)
        self.b3 = [self.conv(cin, 384, (3, 3), 2, "valid")]
        self.b3d = [self.conv(cin, 64, (1, 1)), self.conv(64, 96, (3, 3)),
                    self.conv(96, 96, (3, 3), 2, "valid")]
        self.out_channels = 384 + 96 + cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([_seq(self.b3, x), _seq(self.b3d, x), _max_pool_valid(x)], 1)


class InceptionC(_Block):
    """mixed4-7: factorised 7x7 branches (1x7 / 7x1) with ``c7`` inner channels."""

    def __init__(self, namer: _Namer, cin: int, c7: int):
        super().__init__(namer)
        self.b1 = [self.conv(cin, 192, (1, 1))]
        self.b7 = [self.conv(cin, c7, (1, 1)), self.conv(c7, c7, (1, 7)),
                   self.conv(c7, 192, (7, 1))]
        self.b7d = [self.conv(cin, c7, (1, 1)), self.conv(c7, c7, (7, 1)),
                    self.conv(c7, c7, (1, 7)), self.conv(c7, c7, (7, 1)),
                    self.conv(c7, 192, (1, 7))]
        self.bp = [self.conv(cin, 192, (1, 1), pools_input=True)]
        self.out_channels = 768

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([_seq(self.b1, x), _seq(self.b7, x), _seq(self.b7d, x),
                          _seq(self.bp, x)], 1)


class InceptionD(_Block):
    """mixed8: grid reduction (strided 3x3 after 1x1; strided 3x3 after 7x7) + max pool."""

    def __init__(self, namer: _Namer, cin: int):
        super().__init__(namer)
        self.b3 = [self.conv(cin, 192, (1, 1)), self.conv(192, 320, (3, 3), 2, "valid")]
        self.b7 = [self.conv(cin, 192, (1, 1)), self.conv(192, 192, (1, 7)),
                   self.conv(192, 192, (7, 1)), self.conv(192, 192, (3, 3), 2, "valid")]
        self.out_channels = 320 + 192 + cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([_seq(self.b3, x), _seq(self.b7, x), _max_pool_valid(x)], 1)


class InceptionE(_Block):
    """mixed9-10: expanded 1x3 / 3x1 branches.

    Keras names the inner 3x3 concat ``mixed9_<i>`` (i = 0 in mixed9, 1 in mixed10) and
    leaves the double-3x3 concat as an auto-named ``concatenate[_N]``; both are exposed as
    identity modules so that hooks can capture them.
    """

    def __init__(self, namer: _Namer, cin: int, index: int):
        super().__init__(namer)
        self.b1 = [self.conv(cin, 320, (1, 1))]
        self.b3 = [self.conv(cin, 384, (1, 1))]
        # Lists, not attributes: assigning a module attribute would register it twice.
        self.b3_split = [self.conv(384, 384, (1, 3)), self.conv(384, 384, (3, 1))]
        self._cat3 = f"mixed9_{index}"
        self.add_module(self._cat3, nn.Identity())
        self.b3d = [self.conv(cin, 448, (1, 1)), self.conv(448, 384, (3, 3))]
        self.b3d_split = [self.conv(384, 384, (1, 3)), self.conv(384, 384, (3, 1))]
        self._cat3d = namer("concatenate")
        self.add_module(self._cat3d, nn.Identity())
        self.bp = [self.conv(cin, 192, (1, 1), pools_input=True)]
        self.out_channels = 320 + 768 + 768 + 192

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = _seq(self.b3, x)
        b3 = getattr(self, self._cat3)(torch.cat([c(b3) for c in self.b3_split], 1))
        b3d = _seq(self.b3d, x)
        b3d = getattr(self, self._cat3d)(torch.cat([c(b3d) for c in self.b3d_split], 1))
        return torch.cat([_seq(self.b1, x), b3, b3d, _seq(self.bp, x)], 1)


def _seq(blocks: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for b in blocks:
        x = b(x)
    return x


class _MaxPool(nn.Module):
    """Keras ``max_pooling2d``: 3x3, stride 2, 'valid'. A module so that it can be hooked."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _max_pool_valid(x)


class _GlobalAvgPool(nn.Module):
    """Keras ``pooling='avg'`` (GlobalAveragePooling2D): the 2048-d embedding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class _Softmax(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Softmax in float32 like DeepVariant's float32 head, even under bf16 autocast.
        return torch.softmax(x.float(), dim=-1)


#: Beyond this a float input cannot be ``(x - 128) / 128`` of pixels (which lie in [-1, 1)).
#: Generous, so perturbation or attribution experiments slightly outside still run.
SCALED_LIMIT = 1.5


def _check_scaled(x: torch.Tensor) -> None:
    """Refuse float pixels that were never scaled (DeepVariant's most common port bug).

    ``torch.from_numpy(img).float()`` gives 0..254 floats; taken as scaled input they give
    confident, wrong genotypes (a softmax 0.9 away) with no error anywhere.
    """
    lo, hi = torch.stack(torch.aminmax(x.detach())).float().tolist()  # one device sync
    if hi > SCALED_LIMIT or lo < -SCALED_LIMIT:
        raise ValueError(
            f"float pixels span {lo:g}..{hi:g}: the model takes raw uint8 "
            "pixels (scaled inside) or dvtorch.preprocess() output, which lies in [-1, 1); "
            "pass the uint8 tensor itself, or preprocess it"
        )


class DeepVariantInceptionV3(nn.Module):
    """DeepVariant's Inception-v3 classifier; NHWC float input, softmax ``[N, num_classes]``.

    ``input_shape`` is (H, W, C) as in DeepVariant's example_info.json. Inputs must be
    preprocessed already (``(uint8 - 128) / 128``, see :func:`dvtorch.bundle.preprocess`),
    exactly like DeepVariant's call_variants does outside the SavedModel -- or raw uint8
    pixels, which are scaled inside the forward (:func:`scale_pixels`, the same values): on
    CPU each batch-split thread then scales its own slice straight into the model's dtype.
    """

    def __init__(self, input_shape: tuple[int, int, int] = (100, 221, 7), num_classes: int = 3):
        super().__init__()
        h, w, c = (int(v) for v in input_shape)
        if h < 75 or w < 75 or c < 1:
            # Keras InceptionV3 requires >= 75x75 (below that a reduction yields 0 pixels).
            raise ValueError(f"input_shape must be at least 75x75xC, got {input_shape}")
        self.input_shape = (h, w, c)
        self.num_classes = num_classes
        namer = _Namer()

        def stem(name_cin_cout: tuple[int, int], kernel, stride=1, padding="same"):
            self.add_module(namer("conv2d"), ConvBN(*name_cin_cout, kernel, stride, padding))

        stem((c, 32), (3, 3), 2, "valid")
        stem((32, 32), (3, 3), 1, "valid")
        stem((32, 64), (3, 3))
        self.add_module(namer("max_pooling2d"), _MaxPool())
        stem((64, 80), (1, 1), 1, "valid")
        stem((80, 192), (3, 3), 1, "valid")
        self.add_module(namer("max_pooling2d"), _MaxPool())

        self.mixed0 = InceptionA(namer, 192, 32)
        self.mixed1 = InceptionA(namer, 256, 64)
        self.mixed2 = InceptionA(namer, 288, 64)
        self.mixed3 = InceptionB(namer, 288)
        self.mixed4 = InceptionC(namer, 768, 128)
        self.mixed5 = InceptionC(namer, 768, 160)
        self.mixed6 = InceptionC(namer, 768, 160)
        self.mixed7 = InceptionC(namer, 768, 192)
        self.mixed8 = InceptionD(namer, 768)
        self.mixed9 = InceptionE(namer, 1280, 0)
        self.mixed10 = InceptionE(namer, 2048, 1)
        self.avg_pool = _GlobalAvgPool()
        self.dense = nn.Linear(2048, num_classes)
        self.logits = nn.Identity()
        self.classification = _Softmax()
        # Drop the helper namer (plain Python state must not leak into deepcopy/pickle).
        for m in self.modules():
            if isinstance(m, _Block):
                del m._namer

    _STEM = ("conv2d", "conv2d_1", "conv2d_2", "max_pooling2d",
             "conv2d_3", "conv2d_4", "max_pooling2d_1")
    _MIXED = tuple(f"mixed{i}" for i in range(11))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor of NHWC pixels, got {type(x).__name__}"
                            + (" (torch.from_numpy converts it)" if hasattr(x, "__array__")
                               else ""))
        if x.dtype != torch.uint8 and not x.is_floating_point():
            # int64 pixels come easily from torch.tensor(list) or numpy; taken as floats
            # they would be 0-255 where the model expects (x - 128) / 128.
            raise TypeError(f"got {x.dtype} pixels: pass raw uint8 pixels (scaled inside the "
                            "model) or dvtorch.preprocess() output (float)")
        # (Skipped while tracing, e.g. for ONNX export: the shapes are concrete there and a
        # Python comparison of them only makes the tracer warn.)
        if not torch.jit.is_tracing() and (x.dim() != 4
                                           or tuple(x.shape[1:]) != self.input_shape):
            raise ValueError(
                f"expected NHWC input [N, {', '.join(map(str, self.input_shape))}], "
                f"got {list(x.shape)}"
            )
        ways = self._split_ways(x)
        if ways > 1:
            return parallel.run_split(self._forward, x, ways)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = scale_pixels(x, self.dense.weight.dtype)
        elif not torch.jit.is_tracing() and x.numel() and x.device.type != "meta":
            # Here, not in forward(): split slices run on single-threaded workers, and an
            # OpenMP reduction on the caller's thread hangs a forked child (test_parallel).
            _check_scaled(x)
        x = x.permute(0, 3, 1, 2)  # NCHW view, channels-last strides: no copy.
        # A bf16 model takes the usual float32 input (cast here, after the zero-copy view).
        x = x.to(self.dense.weight.dtype)
        for name in self._STEM + self._MIXED:
            x = getattr(self, name)(x)
        return self.classification(self.logits(self.dense(self.avg_pool(x))))

    def _split_ways(self, x: torch.Tensor) -> int:
        """Batch slices for :mod:`dvtorch.parallel` (1: ordinary forward).

        Only for a model prepared by :func:`optimize_for_inference` (``batch_split``), on
        CPU, without grad or autocast, outside tracing/compiling, and when every hook on a
        submodule is split-safe (``capture`` hooks are; plain hooks keep full batches).
        """
        if not getattr(self, "_batch_split", False) or x.device.type != "cpu" \
                or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu") \
                or torch.jit.is_tracing() or torch.jit.is_scripting() \
                or torch.compiler.is_compiling():
            return 1
        ways = parallel.split_ways(x.shape[0])
        if ways < 2:
            return 1
        modules = self.modules()
        next(modules)  # hooks on the model itself see the full batch either way
        return ways if parallel.hooks_allow_split(modules) else 1

    def conv_blocks(self) -> Iterator[tuple[str, ConvBN]]:
        """``(keras_name, block)`` for the 94 conv blocks in Keras creation order."""
        blocks = [(n.rsplit(".", 1)[-1], m) for n, m in self.named_modules()
                  if isinstance(m, ConvBN)]
        return iter(sorted(blocks, key=lambda nb: _keras_index(nb[0])))


def _keras_index(name: str) -> int:
    """``conv2d`` -> 0, ``conv2d_7`` -> 7 (a fresh session's creation order)."""
    _, _, suffix = name.partition("_")
    return int(suffix) if suffix else 0


def conv_block_names() -> list[str]:
    """The 94 conv block names in creation order (``conv2d``, ``conv2d_1`` ... ``conv2d_93``)."""
    return ["conv2d"] + [f"conv2d_{i}" for i in range(1, 94)]


@torch.no_grad()
def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every ScaleFreeBatchNorm into its conv in place (inference only), return model.

    ``w' = w / sqrt(var + eps)`` per output channel and ``b' = beta - mean / sqrt(var + eps)``;
    mathematically identical, one kernel less per block. The fused model's state dict no
    longer matches the Keras variables, which is why bundles store the unfused form.
    """
    for block in model.modules():
        if isinstance(block, ConvBN) and isinstance(block.bn, ScaleFreeBatchNorm):
            bn = block.bn
            inv = torch.rsqrt(bn.running_var.double() + bn.eps)
            w = block.conv.weight
            w_new = (w.double() * inv.view(-1, 1, 1, 1)).to(w.dtype)
            bias = (bn.beta.double() - bn.running_mean.double() * inv).to(w.dtype)
            block.conv.weight = nn.Parameter(w_new.contiguous(memory_format=_fmt(w)),
                                             requires_grad=False)
            block.conv.bias = nn.Parameter(bias, requires_grad=False)
            block.bn = nn.Identity()
    return model


def pointwise_conv_available() -> bool:
    """Whether this torch build has oneDNN's fused conv+ReLU op and it gives exact results.

    Checked once on a tiny conv against the eager path, so an exotic build degrades to the
    (slower, always correct) eager path instead of producing wrong activations.
    """
    global _POINTWISE_OK
    if _POINTWISE_OK is None:
        _POINTWISE_OK = False
        if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                            "_convolution_pointwise"):
            try:
                gen = torch.Generator().manual_seed(0)
                x = torch.randn(2, 5, 6, 7, generator=gen).contiguous(
                    memory_format=torch.channels_last)
                conv = nn.Conv2d(5, 4, (1, 3), padding=(0, 1))
                with torch.no_grad():
                    ref = torch.relu(conv(x))
                    got = torch.ops.mkldnn._convolution_pointwise(
                        x, conv.weight, conv.bias, [0, 1], [1, 1], [1, 1], 1, "relu", [], "")
                _POINTWISE_OK = bool(torch.allclose(got, ref, atol=1e-5, rtol=1e-5))
            except (RuntimeError, NotImplementedError):
                _POINTWISE_OK = False
    return _POINTWISE_OK


_POINTWISE_OK: bool | None = None


def optimize_for_inference(model: DeepVariantInceptionV3, dtype: torch.dtype | None = None,
                           batch_size: int = 32,
                           batch_split: bool = True) -> DeepVariantInceptionV3:
    """Inference-only speedups that keep every hookable module, applied in place.

    BN folding; optional cast to ``dtype`` (e.g. ``torch.bfloat16``: inputs are cast on entry,
    the softmax stays float32); channels-last weights (the NHWC input already is
    channels-last); on CPU, oneDNN conv+bias+ReLU fusion with weights pre-packed into
    oneDNN's blocked layout for ``batch_size`` (other batch sizes stay correct, the
    kernel just reorders again); a bf16 model on a CPU where oneDNN has no bf16
    convolution (below AVX-512) keeps ATen's plain path instead: slow, but it runs. Call it
    again after moving the model to another device/dtype. Hooks on conv blocks still see
    the block's ReLU output; a block whose inner ``conv`` / ``bn`` / ``relu`` child carries
    a hook runs them one by one so that the hook fires (the conv child's output is then the
    pre-ReLU value with BN folded in). Weights changed afterwards (``load_state_dict``, an
    ablation under ``torch.no_grad()``) are repacked on the next forward; an edit through
    ``.data`` is invisible to that check: call this function again after one.

    ``batch_split`` (CPU): with ``torch.get_num_threads() == n > 1``, no-grad forwards run
    as ``n`` single-threaded forwards on slices of the batch in worker threads
    (:mod:`dvtorch.parallel`; same outputs, no per-operator thread barriers), and weights
    are packed for the slice size. ``capture`` hooks gather the slices; any other hook on
    a submodule switches a forward back to the ordinary path.
    """
    fuse_batchnorm(model)
    if dtype is not None:
        model.to(dtype)
    model.to(memory_format=torch.channels_last)
    fused = pointwise_conv_available() and model.dense.weight.device.type == "cpu" \
        and (model.dense.weight.dtype != torch.bfloat16 or mkldnn_bf16())
    for block in model.modules():
        if isinstance(block, ConvBN):
            block._fused = None
    model._batch_split = bool(batch_split) and model.dense.weight.device.type == "cpu"
    if model._batch_split:
        batch_size = parallel.slice_sizes(batch_size, parallel.split_ways(batch_size))[0]
    shapes = _conv_input_shapes(model, batch_size) if fused else {}
    for block in model.modules():
        if isinstance(block, ConvBN):
            block._fused = _fused_conv(block.conv, shapes[id(block.conv)]) if fused else None
    return model.eval()


def _fused_conv(conv: nn.Conv2d, input_size: list[int]) -> _FusedConv:
    packed = _pack_weight(conv, input_size)
    return _FusedConv(op=torch.ops.mkldnn._convolution_pointwise.default,
                      weight=conv.weight if packed is None else packed, bias=conv.bias,
                      padding=list(conv.padding), stride=list(conv.stride),
                      dilation=list(conv.dilation), groups=conv.groups,
                      dtype=conv.weight.dtype, source=conv.weight,
                      version=_version(conv.weight), data_ptr=conv.weight.data_ptr(),
                      input_size=list(input_size))


def _version(t: torch.Tensor) -> int:
    """``t``'s in-place version counter; -1 for an inference tensor, which has none (it
    cannot be edited in place outside inference mode)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def _pack_weight(conv: nn.Conv2d, input_size: list[int]) -> torch.Tensor | None:
    """oneDNN-blocked weight for ``input_size`` (None if this build cannot pack it)."""
    try:
        with torch.no_grad():
            return torch._C._nn.mkldnn_reorder_conv2d_weight(
                conv.weight.detach().to_mkldnn(), list(conv.padding), list(conv.stride),
                list(conv.dilation), conv.groups, input_size)
    except (RuntimeError, AttributeError):
        return None


def _conv_input_shapes(model: DeepVariantInceptionV3, batch_size: int) -> dict[int, list[int]]:
    """Input NCHW size of every conv for a batch of ``batch_size``.

    One zero-input forward of batch 1 on the model itself (tens of milliseconds; a meta
    device forward costs seconds through Python decompositions). Conv blocks must not be
    on the fused path yet, or the conv modules' pre-hooks would not fire.
    """
    shapes: dict[int, list[int]] = {}
    handles = []
    for conv in model.modules():
        if isinstance(conv, nn.Conv2d):
            def pre(_m, args, key=id(conv)):
                shapes[key] = [batch_size, *args[0].shape[1:]]
            handles.append(conv.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            model(torch.zeros((1, *model.input_shape), device=model.dense.weight.device))
    finally:
        for h in handles:
            h.remove()
    return shapes


def _fmt(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
