"""Layer names of :class:`DeepVariantInceptionV3` and their output shapes.

Users (and the blog post) speak of Keras layer names: ``mixed5``, ``conv2d_40``,
``mixed9_0``. Inside the module some of these live nested (``mixed5.conv2d_40``), so every
lookup goes through :func:`resolve`, the one place that knows the mapping.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

import torch
from torch import nn

from dvtorch.errors import DvprobeError
from dvtorch.inception import ConvBN, DeepVariantInceptionV3, MaxPool

STEM_NAMES: tuple[str, ...] = ("conv2d", "conv2d_1", "conv2d_2", "max_pooling2d",
                               "conv2d_3", "conv2d_4", "max_pooling2d_1")
MIXED_NAMES: tuple[str, ...] = tuple(f"mixed{i}" for i in range(11))

#: The layers most probing work uses, in forward order (inner concats of mixed9/mixed10
#: listed after the blocks that contain them). Every conv block is also addressable, see
#: :func:`all_layer_names`.
LAYER_NAMES: list[str] = [*STEM_NAMES, *MIXED_NAMES, "mixed9_0", "mixed9_1",
                          "avg_pool", "logits", "classification"]


class UnknownLayerError(DvprobeError, KeyError):
    """A layer name that the model does not have (message lists close names)."""

    def __str__(self) -> str:  # KeyError would repr() the message with quotes.
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class LayerInfo:
    """One capturable layer: its Keras name, output map ``(H, W, C)`` and channel count.

    Vector layers (``avg_pool``, ``logits``, ``classification``) have ``shape_hwc = (C,)``.
    """

    name: str
    shape_hwc: tuple[int, ...]
    channels: int

    @property
    def flat_dim(self) -> int:
        """Width of a ``pool="flatten"`` row."""
        n = 1
        for s in self.shape_hwc:
            n *= s
        return n


def _name_index(model: nn.Module) -> tuple[dict[str, nn.Module], set[str]]:
    """Map each Keras-style leaf name (last path component) to its module, and the leaf
    names that occur more than once.

    Nested blocks register children under globally unique Keras names, so in one network
    the last path component is unique; internal child names (conv, bn, relu) repeat, and
    so does everything when a container holds two networks.
    """
    index: dict[str, nn.Module] = {}
    repeated: set[str] = set()
    for path, module in model.named_modules():
        if not path:
            continue
        leaf = path.rsplit(".", 1)[-1]
        if leaf in index and index[leaf] is not module:
            repeated.add(leaf)
        else:
            index.setdefault(leaf, module)
    return {k: v for k, v in index.items() if k not in repeated}, repeated


# Keras's conv2d_bn names its tensors conv2d_N (the raw conv), batch_normalization_N and
# activation_N (after BN and ReLU); a ConvBN block's output -- what ``conv2d_N`` captures
# here, the name DeepVariant users know -- is activation_N, so that name is accepted too.
_ACTIVATION = re.compile(r"activation(_\d+)?")
_INTERNAL = ("conv", "bn", "relu", "dense")


def all_layer_names(model: DeepVariantInceptionV3) -> list[str]:
    """Every capturable name in forward order: stem, each block's convs then its concat(s).

    Forward order (not alphabetical) so that listings read top-to-bottom like the network.
    """
    names: list[str] = list(STEM_NAMES)
    for mixed in MIXED_NAMES:
        block = getattr(model, mixed)
        inner = [n for n, m in block.named_children()
                 if isinstance(m, (ConvBN, MaxPool, nn.Identity))]
        names.extend(inner)
        names.append(mixed)
    names.extend(["avg_pool", "logits", "classification"])
    return names


def resolve(model: nn.Module, name: str) -> nn.Module:
    """The submodule whose forward output is the Keras layer ``name``.

    Raises :class:`UnknownLayerError` listing close matches, so a typo such as
    ``mixed_5`` gets "did you mean mixed5" instead of a bare KeyError.
    """
    index, repeated = _name_index(model)
    if _ACTIVATION.fullmatch(name):
        name = name.replace("activation", "conv2d", 1)
    module = index.get(name)
    if module is not None and name not in _INTERNAL:
        return module
    if name in repeated and name not in _INTERNAL:
        raise UnknownLayerError(
            f"layer {name!r} is ambiguous: several submodules of this {type(model).__name__} "
            "carry that name (two networks in one container?); capture on the DeepVariant "
            "model itself")
    if name == "dense":
        hint = "; the Dense layer's output is 'logits' (its softmax: 'classification')"
    else:
        valid = [n for n in index if n not in _INTERNAL and n != name]
        close = difflib.get_close_matches(name, valid, n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UnknownLayerError(
        f"unknown layer {name!r}{hint} (known: conv2d..conv2d_93 (= Keras activation_N), "
        f"max_pooling2d(_1), {', '.join(LAYER_NAMES[7:])}, concatenate, concatenate_1)"
    )


def layer_info(model: DeepVariantInceptionV3,
               input_shape: tuple[int, int, int] | None = None,
               names: list[str] | None = None) -> list[LayerInfo]:
    """Output shape of each layer in ``names`` (default :data:`LAYER_NAMES`).

    Runs one zero-input forward of batch 1 on the model itself with hooks on the requested
    modules, so the answer always matches the real topology (tens of milliseconds on CPU;
    a meta-device forward would cost seconds through Python decompositions).
    """
    shape = tuple(input_shape) if input_shape is not None else model.input_shape
    if tuple(shape) != tuple(model.input_shape):
        raise ValueError(f"model was built for input {model.input_shape}, asked about {shape}")
    names = list(names) if names is not None else list(LAYER_NAMES)
    modules = {n: resolve(model, n) for n in names}  # fail on unknown names first
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    try:
        for n, m in modules.items():
            def hook(_m, _inp, out, n=n):
                shapes[n] = tuple(out.shape[1:])
            handles.append(m.register_forward_hook(hook))
        with torch.no_grad():
            model(torch.zeros((1, *shape), device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    out = []
    for n in names:
        s = shapes[n]
        hwc = (s[1], s[2], s[0]) if len(s) == 3 else s
        out.append(LayerInfo(n, tuple(int(v) for v in hwc), int(hwc[-1])))
    return out
