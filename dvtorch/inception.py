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

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

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

    The module's output is the Keras ``activation_N`` tensor; its children ``conv``, ``bn``
    and ``relu`` are Keras's ``conv2d_N``, ``batch_normalization_N`` and the ReLU, each
    hookable. ``pools_input`` (the pool branches): the block also owns the 3x3 average pool
    before its 1x1 conv (that Keras layer has no name of its own), so its forward
    pre-hooks see the unpooled block input.
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
        # Not in place: a hook on ``conv`` or ``bn`` may keep the tensor the ReLU reads.
        self.relu = nn.ReLU()
        self.pools_input = pools_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pools_input:
            x = avg_pool_same(x)
        return self.relu(self.bn(self.conv(x)))


def scale_pixels(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """DeepVariant's input scaling ``(x - 128) / 128`` of uint8 pixels, in ``dtype``.

    Computed as ``-1 + x / 128`` in one pass over the uint8 pixels (``torch.add`` with a
    0-dim ``-1`` and ``alpha``; a cast, multiply and subtract took three passes over a
    32-bit or 16-bit copy). Every step is exact for 0..255
    (powers of two; at most 8 significant bits), so float32 and bfloat16 give exactly
    DeepVariant's values. The 0-dim ``-1`` lives on the CPU whatever the images' device:
    PyTorch takes a 0-dim CPU tensor as a scalar in a CUDA op (no host-to-device copy per
    batch), and its dtype still sets the result's.
    """
    minus_one = torch.tensor(-1.0, dtype=dtype)
    return torch.add(minus_one, images, alpha=1.0 / 128.0)


def avg_pool_same(x: torch.Tensor) -> torch.Tensor:
    """Keras ``AveragePooling2D((3, 3), strides=1, padding='same')``: padding not averaged."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def max_pool_valid(x: torch.Tensor) -> torch.Tensor:
    """Keras ``MaxPooling2D((3, 3), strides=(2, 2))`` ('valid')."""
    return F.max_pool2d(x, 3, stride=2)


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

    Branches are tuples of child *names*, looked up at each forward, so that replacing a
    child (``model.set_submodule``, or an engine's fused copy) changes what runs.
    """

    def __init__(self, namer: _Namer):
        super().__init__()
        self._namer = namer

    def conv(self, cin: int, cout: int, kernel: tuple[int, int], stride: int = 1,
             padding: str = "same", pools_input: bool = False) -> str:
        """Register the next Keras-named conv block (creation order); return its name."""
        name = self._namer("conv2d")
        self.add_module(name, ConvBN(cin, cout, kernel, stride, padding, pools_input))
        return name

    def branch(self, names: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
        """Run the named children one after the other."""
        for name in names:
            x = getattr(self, name)(x)
        return x

    def max_pool(self, name: str) -> str:
        """Register a branch max pool under its Keras name (``max_pooling2d_N``)."""
        self.add_module(name, MaxPool())
        return name


class InceptionA(_Block):
    """mixed0-2 (35x35 grid in ImageNet): 1x1, 5x5, double 3x3 and avg-pool branches."""

    def __init__(self, namer: _Namer, cin: int, pool_features: int):
        super().__init__(namer)
        self.b1 = (self.conv(cin, 64, (1, 1)),)
        self.b5 = (self.conv(cin, 48, (1, 1)), self.conv(48, 64, (5, 5)))
        self.b3 = (self.conv(cin, 64, (1, 1)), self.conv(64, 96, (3, 3)),
                   self.conv(96, 96, (3, 3)))
        self.bp = (self.conv(cin, pool_features, (1, 1), pools_input=True),)
        self.out_channels = 64 + 64 + 96 + pool_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch(self.b1, x), self.branch(self.b5, x), self.branch(self.b3, x),
                          self.branch(self.bp, x)], 1)


class InceptionB(_Block):
    """mixed3: grid reduction with a strided 3x3, a strided double 3x3 and a max pool."""

    def __init__(self, namer: _Namer, cin: int):
        super().__init__(namer)
        self.b3 = (self.conv(cin, 384, (3, 3), 2, "valid"),)
        self.b3d = (self.conv(cin, 64, (1, 1)), self.conv(64, 96, (3, 3)),
                    self.conv(96, 96, (3, 3), 2, "valid"))
        self.bp = (self.max_pool(namer("max_pooling2d")),)
        self.out_channels = 384 + 96 + cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch(self.b3, x), self.branch(self.b3d, x),
                          self.branch(self.bp, x)], 1)


class InceptionC(_Block):
    """mixed4-7: factorised 7x7 branches (1x7 / 7x1) with ``c7`` inner channels."""

    def __init__(self, namer: _Namer, cin: int, c7: int):
        super().__init__(namer)
        self.b1 = (self.conv(cin, 192, (1, 1)),)
        self.b7 = (self.conv(cin, c7, (1, 1)), self.conv(c7, c7, (1, 7)),
                   self.conv(c7, 192, (7, 1)))
        self.b7d = (self.conv(cin, c7, (1, 1)), self.conv(c7, c7, (7, 1)),
                    self.conv(c7, c7, (1, 7)), self.conv(c7, c7, (7, 1)),
                    self.conv(c7, 192, (1, 7)))
        self.bp = (self.conv(cin, 192, (1, 1), pools_input=True),)
        self.out_channels = 768

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch(self.b1, x), self.branch(self.b7, x),
                          self.branch(self.b7d, x), self.branch(self.bp, x)], 1)


class InceptionD(_Block):
    """mixed8: grid reduction (strided 3x3 after 1x1; strided 3x3 after 7x7) + max pool."""

    def __init__(self, namer: _Namer, cin: int):
        super().__init__(namer)
        self.b3 = (self.conv(cin, 192, (1, 1)), self.conv(192, 320, (3, 3), 2, "valid"))
        self.b7 = (self.conv(cin, 192, (1, 1)), self.conv(192, 192, (1, 7)),
                   self.conv(192, 192, (7, 1)), self.conv(192, 192, (3, 3), 2, "valid"))
        self.bp = (self.max_pool(namer("max_pooling2d")),)
        self.out_channels = 320 + 192 + cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch(self.b3, x), self.branch(self.b7, x),
                          self.branch(self.bp, x)], 1)


class InceptionE(_Block):
    """mixed9-10: expanded 1x3 / 3x1 branches.

    Keras names the inner 3x3 concat ``mixed9_<i>`` (i = 0 in mixed9, 1 in mixed10) and
    leaves the double-3x3 concat as an auto-named ``concatenate[_N]``; both are exposed as
    identity modules so that hooks can capture them.
    """

    def __init__(self, namer: _Namer, cin: int, index: int):
        super().__init__(namer)
        self.b1 = (self.conv(cin, 320, (1, 1)),)
        self.b3 = (self.conv(cin, 384, (1, 1)),)
        self.b3_split = (self.conv(384, 384, (1, 3)), self.conv(384, 384, (3, 1)))
        self._cat3 = f"mixed9_{index}"
        self.add_module(self._cat3, nn.Identity())
        self.b3d = (self.conv(cin, 448, (1, 1)), self.conv(448, 384, (3, 3)))
        self.b3d_split = (self.conv(384, 384, (1, 3)), self.conv(384, 384, (3, 1)))
        self._cat3d = namer("concatenate")
        self.add_module(self._cat3d, nn.Identity())
        self.bp = (self.conv(cin, 192, (1, 1), pools_input=True),)
        self.out_channels = 320 + 768 + 768 + 192

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch(self.b3, x)
        b3 = getattr(self, self._cat3)(self._split(self.b3_split, b3))
        b3d = self.branch(self.b3d, x)
        b3d = getattr(self, self._cat3d)(self._split(self.b3d_split, b3d))
        return torch.cat([self.branch(self.b1, x), b3, b3d, self.branch(self.bp, x)], 1)

    def _split(self, names: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
        """The 1x3 and 3x1 convs side by side on the same input, concatenated."""
        return torch.cat([getattr(self, n)(x) for n in names], 1)


class MaxPool(nn.Module):
    """Keras ``max_pooling2d``: 3x3, stride 2, 'valid'. A module so that it can be hooked
    (and replaced by an engine)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool_valid(x)


class GlobalAvgPool(nn.Module):
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
    pixels, which are scaled inside the forward (:func:`scale_pixels`, the same values).

    A plain module: autograd, forward hooks (:mod:`dvtorch.hooks`), weight edits,
    ``copy.deepcopy`` and ``torch.compile`` behave as on any ``nn.Module``. Bulk inference
    runs through an engine built beside it (:mod:`dvtorch.engine`), never by changing it.
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
        self.add_module(namer("max_pooling2d"), MaxPool())
        stem((64, 80), (1, 1), 1, "valid")
        stem((80, 192), (3, 3), 1, "valid")
        self.add_module(namer("max_pooling2d"), MaxPool())

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
        self.avg_pool = GlobalAvgPool()
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
        if x.dtype == torch.uint8:
            x = scale_pixels(x, self.dense.weight.dtype)
        elif not torch.jit.is_tracing() and x.numel() and x.device.type != "meta":
            _check_scaled(x)
        x = x.permute(0, 3, 1, 2)  # NCHW view, channels-last strides: no copy.
        # A bf16 model takes the usual float32 input (cast here, after the zero-copy view).
        x = x.to(self.dense.weight.dtype)
        for name in self._STEM + self._MIXED:
            x = getattr(self, name)(x)
        return self.classification(self.logits(self.dense(self.avg_pool(x))))

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


def _fmt(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
