"""Import the weights of a tf2onnx export of DeepVariant's Keras model into the native module.

Matching is by **topology, never by name**. Keras names carry session-dependent numeric
suffixes (``conv2d_95`` in a session that built a model before) and tf2onnx prefixes them
with the SavedModel call path, so names are unreliable. Instead both graphs are walked the
same way: a depth-first post-order traversal from the classifier output, visiting each
node's data inputs in argument order (concat order = channel order). The sequence of
convolutions this yields depends only on the DAG, so the k-th ONNX Conv is the k-th
native conv. Every pair is then checked (kernel shape, stride, padding) and the counts of
mapped and expected tensors must agree exactly: any mismatch raises ``ConversionError``
rather than loading a partial model (pitfall: silent partial matching).

What tf2onnx emits (tf2onnx 1.16, opset 17, checked on a randomised DeepVariant model):
one ``Transpose`` NHWC->NCHW at the input, then NCHW throughout; each Keras
Conv2D+BatchNorm is one ``Conv`` with BN folded in (``..._weights_fused_bn`` /
``..._bias_fused_bn``); the branch ``AveragePool`` has pads 1 and the ONNX default
``count_include_pad=0`` (= Keras); nested concats of mixed9/mixed10 are merged into
their block's concat, so ``mixed9_0`` / ``mixed9_1`` do not exist as tensors; the head is
``GlobalAveragePool -> Squeeze -> MatMul -> Add -> Softmax``. Unfolded
``Conv -> BatchNormalization`` pairs (other exporters, optimiser off) are imported too.

:func:`load_onnx` and :func:`onnx_input_shape` read and check an ONNX file for conversion and
verification alike (here, below both, so that neither imports the other).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch.overrides import TorchFunctionMode

from dvtorch.errors import ConversionError
from dvtorch.inception import BN_EPS, DeepVariantInceptionV3

# ---------------------------------------------------------------------------------------
# ONNX side


def load_onnx(path: str | os.PathLike, data: bytes | None = None) -> onnx.ModelProto:
    """Read and check an ONNX file (``data``: its bytes, when already read); a truncated or
    garbage file gives a ConversionError."""
    try:
        model = onnx.load_from_string(data) if data is not None else onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # DecodeError, ValidationError, ...
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ConversionError(
            f"{path}: corrupt or invalid ONNX file ({type(exc).__name__}: {first[:200]}); "
            "re-export it or convert from the checkpoint/SavedModel instead"
        ) from None
    if not model.graph.node:
        raise ConversionError(f"{path}: ONNX file has an empty graph")
    return model


def onnx_input_shape(model: onnx.ModelProto) -> tuple[int | None, int | None, int | None]:
    """(H, W, C) of the single NHWC graph input; None for symbolic dimensions."""
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ConversionError(
            f"ONNX graph has {len(inputs)} inputs; a DeepVariant classifier has exactly one (NHWC image)"
        )
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        raise ConversionError(
            f"ONNX input {inputs[0].name!r} has rank {len(dims)}, expected NHWC rank 4"
        )
    return tuple(
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims[1:]
    )  # type: ignore[return-value]


@dataclass
class _OnnxGraph:
    """Index of an ONNX graph: producers, consumers and constant tensors by name."""

    nodes: list[onnx.NodeProto]
    producer: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]
    consts: dict[str, np.ndarray]
    outputs: list[str]

    @classmethod
    def build(cls, model: onnx.ModelProto) -> _OnnxGraph:
        g = model.graph
        consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        producer: dict[str, onnx.NodeProto] = {}
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in g.node:
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value":
                        consts[node.output[0]] = numpy_helper.to_array(a.t)
                continue
            for o in node.output:
                producer[o] = node
            for i in node.input:
                consumers.setdefault(i, []).append(node)
        # Identity of a constant is still a constant (some exporters add them).
        for node in g.node:
            if node.op_type == "Identity" and node.input[0] in consts:
                consts[node.output[0]] = consts[node.input[0]]
        return cls(list(g.node), producer, consumers, consts, [o.name for o in g.output])

    def const(self, name: str, what: str) -> np.ndarray:
        if name not in self.consts:
            raise ConversionError(f"ONNX graph: {what} ({name!r}) is not a constant tensor")
        return self.consts[name]

    def data_inputs(self, node: onnx.NodeProto) -> list[str]:
        """Inputs produced by other (non-constant) nodes, in argument order."""
        return [i for i in node.input if i and i not in self.consts and i in self.producer]

    def postorder(self, output: str) -> list[onnx.NodeProto]:
        """DFS post-order of the nodes that ``output`` depends on (iterative: no recursion limit)."""
        order: list[onnx.NodeProto] = []
        seen: set[int] = set()
        stack: list[tuple[onnx.NodeProto, bool]] = [(self.producer[output], False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if id(node) in seen:
                continue
            seen.add(id(node))
            stack.append((node, True))
            for i in reversed(self.data_inputs(node)):
                child = self.producer[i]
                if id(child) not in seen:
                    stack.append((child, False))
        return order

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 else None


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _classifier_output(g: _OnnxGraph) -> str:
    """The softmax output (DeepVariant's ``classification``); the only graph output."""
    if len(g.outputs) != 1:
        raise ConversionError(
            f"ONNX graph has {len(g.outputs)} outputs {g.outputs}; expected exactly one "
            "(DeepVariant's 'classification' softmax)"
        )
    out = g.outputs[0]
    node = g.producer.get(out)
    if node is None or node.op_type != "Softmax":
        raise ConversionError(
            f"ONNX graph output {out!r} is produced by "
            f"{node.op_type if node else 'nothing'}, expected Softmax (DeepVariant classifier)"
        )
    return out


@dataclass
class _DenseParams:
    weight: np.ndarray  # [out, in]
    bias: np.ndarray
    input_name: str     # the pooled 2048-d embedding
    logits_name: str


def _dense(g: _OnnxGraph, softmax_out: str) -> _DenseParams:
    """Find ``MatMul + Add`` or ``Gemm`` feeding the Softmax."""
    node = g.producer[softmax_out]
    logits = node.input[0]
    pre = g.producer.get(logits)
    if pre is not None and pre.op_type == "Gemm":
        if _attr(pre, "transA", 0) or float(_attr(pre, "alpha", 1.0)) != 1.0 \
                or float(_attr(pre, "beta", 1.0)) != 1.0:
            raise ConversionError("ONNX classifier Gemm uses transA/alpha/beta; not supported")
        w = g.const(pre.input[1], "classifier weight")
        w = w if _attr(pre, "transB", 0) else w.T
        b = g.const(pre.input[2], "classifier bias")
        return _DenseParams(w, b, pre.input[0], logits)
    if pre is not None and pre.op_type == "Add":
        a, c = pre.input
        bias_name, mm_out = (c, a) if c in g.consts else (a, c)
        mm = g.producer.get(mm_out)
        if mm is not None and mm.op_type == "MatMul":
            w = g.const(mm.input[1], "classifier weight").T  # Keras [in, out] -> [out, in]
            return _DenseParams(w, g.const(bias_name, "classifier bias"), mm.input[0], logits)
    raise ConversionError(
        "ONNX graph: the Softmax is not fed by MatMul+Add or Gemm; this is not a DeepVariant "
        "Inception-v3 classifier head"
    )


@dataclass
class _OnnxConv:
    node: onnx.NodeProto
    weight: np.ndarray
    bias: np.ndarray | None
    bn: dict[str, np.ndarray] | None  # scale, B, mean, var, eps (when not folded)


def _onnx_convs(g: _OnnxGraph, softmax_out: str) -> list[_OnnxConv]:
    convs = []
    for node in g.postorder(softmax_out):
        if node.op_type != "Conv":
            continue
        if int(_attr(node, "group", 1)) != 1:
            raise ConversionError(f"ONNX Conv {node.name!r} is grouped; Inception-v3 has none")
        w = g.const(node.input[1], f"weight of Conv {node.name!r}")
        b = g.const(node.input[2], f"bias of Conv {node.name!r}") \
            if len(node.input) > 2 and node.input[2] else None
        bn = None
        nxt = g.only_consumer(node.output[0])
        if nxt is not None and nxt.op_type == "BatchNormalization":
            names = ("scale", "B", "mean", "var")
            bn = {k: g.const(nxt.input[i + 1], f"BatchNormalization {k} after {node.name!r}")
                  for i, k in enumerate(names)}
            bn["eps"] = np.float64(_attr(nxt, "epsilon", 1e-5))
        convs.append(_OnnxConv(node, w, b, bn))
    return convs


def _onnx_padding(node: onnx.NodeProto, kernel: tuple[int, int], in_hw=None) -> tuple[int, int]:
    """Symmetric (pad_h, pad_w) of an ONNX Conv, resolving SAME auto_pad for stride 1."""
    auto = _attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    strides = tuple(_attr(node, "strides", [1, 1]))
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        if strides != (1, 1):
            raise ConversionError(f"ONNX Conv {node.name!r}: strided SAME padding not expected")
        return kernel[0] // 2, kernel[1] // 2
    if auto == "VALID":
        return 0, 0
    pads = list(_attr(node, "pads", [0, 0, 0, 0]))
    if pads[0] != pads[2] or pads[1] != pads[3]:
        raise ConversionError(f"ONNX Conv {node.name!r}: asymmetric pads {pads} not expected")
    return pads[0], pads[1]


# ---------------------------------------------------------------------------------------
# native side: record the DAG of one meta-device forward


class _Recorder(TorchFunctionMode):
    """Records every torch function call as (func, input tensors, output tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[torch.Tensor], torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            ins = _flatten_tensors(args) + _flatten_tensors((kwargs or {}).values())
            # In-place ops (relu_) return their input: recording them would make a cycle.
            if not any(t is out for t in ins):
                self.calls.append((getattr(func, "__name__", str(func)), ins, out))
        return out


def _flatten_tensors(xs: Iterable) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for x in xs:
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            out.extend(_flatten_tensors(x))
    return out


@dataclass
class _NativeConv:
    prefix: str  # e.g. "mixed0.conv2d_5" (state-dict prefix of the ConvBN block)
    weight_shape: tuple[int, ...]
    stride: tuple[int, int]
    padding: tuple[int, int]


def native_conv_order(model: DeepVariantInceptionV3) -> list[_NativeConv]:
    """Native conv blocks in the same DFS post-order that :func:`_onnx_convs` uses."""
    with torch.device("meta"):
        clone = DeepVariantInceptionV3(model.input_shape, model.num_classes).eval()
    owner = {}
    for path, mod in clone.named_modules():
        if isinstance(mod, torch.nn.Conv2d):
            owner[id(mod.weight)] = (path.rsplit(".", 1)[0], mod)
    params = {id(t) for t in list(clone.parameters()) + list(clone.buffers())}
    rec = _Recorder()
    with torch.no_grad(), rec:
        out = clone(torch.empty((1, *clone.input_shape), device="meta"))
    producer = {id(o): (name, ins) for name, ins, o in rec.calls}
    order: list[_NativeConv] = []
    seen: set[int] = set()
    stack: list[tuple[int, bool]] = [(id(out), False)]
    while stack:
        tid, expanded = stack.pop()
        name, ins = producer[tid]
        if expanded:
            w = [t for t in ins if id(t) in owner]
            if w:
                prefix, conv = owner[id(w[0])]
                order.append(_NativeConv(prefix, tuple(conv.weight.shape),
                                         tuple(conv.stride), tuple(conv.padding)))
            continue
        if tid in seen:
            continue
        seen.add(tid)
        stack.append((tid, True))
        data = [t for t in ins if id(t) not in params and id(t) in producer]
        for t in reversed(data):
            if id(t) not in seen:
                stack.append((id(t), False))
    return order


# ---------------------------------------------------------------------------------------
# public API


def _input_shape(model: onnx.ModelProto) -> tuple[int, int, int]:
    inputs = [i for i in model.graph.input
              if i.name not in {x.name for x in model.graph.initializer}]
    if len(inputs) != 1:
        raise ConversionError(f"ONNX graph has {len(inputs)} data inputs; expected one NHWC image")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if len(shape) != 4 or any(s is None for s in shape[1:]):
        raise ConversionError(
            f"ONNX input {inputs[0].name!r} has shape {shape}; expected [N, H, W, C] with fixed "
            "H, W, C (DeepVariant's NHWC example image)"
        )
    return int(shape[1]), int(shape[2]), int(shape[3])


def _to_native_bn(c: _OnnxConv, what: str) -> dict[str, np.ndarray]:
    """Native (weight, beta, mean, var) for one ONNX conv, exact in float64 then cast.

    Keras form (no conv bias, BN without gamma, eps 1e-3) is kept unfused. Anything else
    (tf2onnx's folded form, or a BN with gamma/another eps) is folded completely into
    weight and beta with mean 0 and var ``1 - eps`` so the native BN is the identity.
    """
    w = c.weight.astype(np.float64)
    if c.bn is not None and c.bias is None and np.all(c.bn["scale"] == 1.0) \
            and abs(float(c.bn["eps"]) - BN_EPS) < 1e-12:
        return {"weight": c.weight.astype(np.float32), "beta": c.bn["B"].astype(np.float32),
                "mean": c.bn["mean"].astype(np.float32),
                "var": c.bn["var"].astype(np.float32)}
    bias = c.bias.astype(np.float64) if c.bias is not None else np.zeros(w.shape[0])
    if c.bn is not None:
        k = c.bn["scale"].astype(np.float64) / np.sqrt(c.bn["var"].astype(np.float64)
                                                       + float(c.bn["eps"]))
        w = w * k[:, None, None, None]
        bias = (bias - c.bn["mean"].astype(np.float64)) * k + c.bn["B"].astype(np.float64)
    if bias.shape != (w.shape[0],):
        raise ConversionError(f"{what}: bias shape {bias.shape} does not match {w.shape[0]} filters")
    return {"weight": w.astype(np.float32), "beta": bias.astype(np.float32),
            "mean": np.zeros(w.shape[0], np.float32),
            "var": np.full(w.shape[0], 1.0 - BN_EPS, np.float32)}


def state_dict_from_onnx(model: onnx.ModelProto) -> dict[str, torch.Tensor]:
    """Native state dict (BN unfused layout) for a tf2onnx export of DeepVariant's model.

    Works for flat and nested-backbone Keras models (names are never used). Raises
    :class:`ConversionError` if the graph is not DeepVariant's Inception-v3 or if any
    expected tensor is left unmapped.
    """
    input_shape = _input_shape(model)
    g = _OnnxGraph.build(model)
    softmax_out = _classifier_output(g)
    dense = _dense(g, softmax_out)
    onnx_convs = _onnx_convs(g, softmax_out)
    native = DeepVariantInceptionV3(input_shape, num_classes=int(dense.weight.shape[0]))
    order = native_conv_order(native)
    if len(onnx_convs) != len(order):
        raise ConversionError(
            f"ONNX graph has {len(onnx_convs)} convolutions on the path to the classifier, "
            f"DeepVariant's Inception-v3 has {len(order)}; not the expected model"
        )
    sd: dict[str, torch.Tensor] = {}
    for k, (oc, nc) in enumerate(zip(onnx_convs, order, strict=True)):
        what = f"conv #{k} (ONNX node {oc.node.name!r} -> native {nc.prefix})"
        kernel = tuple(int(v) for v in oc.weight.shape[2:])
        if tuple(oc.weight.shape) != nc.weight_shape:
            raise ConversionError(f"{what}: weight shape {tuple(oc.weight.shape)} != "
                                  f"expected {nc.weight_shape}; graph topology differs")
        stride = tuple(int(s) for s in _attr(oc.node, "strides", [1, 1]))
        pad = _onnx_padding(oc.node, kernel)
        if stride != nc.stride or pad != nc.padding:
            raise ConversionError(f"{what}: stride/padding {stride}/{pad} != expected "
                                  f"{nc.stride}/{nc.padding}")
        p = _to_native_bn(oc, what)
        sd[f"{nc.prefix}.conv.weight"] = torch.from_numpy(p["weight"])
        sd[f"{nc.prefix}.bn.beta"] = torch.from_numpy(p["beta"])
        sd[f"{nc.prefix}.bn.running_mean"] = torch.from_numpy(p["mean"])
        sd[f"{nc.prefix}.bn.running_var"] = torch.from_numpy(p["var"])
    sd["dense.weight"] = torch.from_numpy(np.array(dense.weight, np.float32, copy=True))
    sd["dense.bias"] = torch.from_numpy(np.array(dense.bias, np.float32, copy=True))
    _check_complete(sd, native)
    _check_avg_pools(g)
    return sd


def _check_complete(sd: dict[str, torch.Tensor], native: DeepVariantInceptionV3) -> None:
    expected = native.state_dict()
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    if missing or extra:
        raise ConversionError(
            f"ONNX import mapped {len(sd)} tensors, the model has {len(expected)}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ConversionError(f"ONNX import: {k} has shape {tuple(sd[k].shape)}, "
                                  f"expected {tuple(v.shape)}")


def _check_avg_pools(g: _OnnxGraph) -> None:
    """Keras' 'same' average pool excludes padding; an ONNX graph that includes it is not ours."""
    for node in g.nodes:
        if node.op_type == "AveragePool" and int(_attr(node, "count_include_pad", 0)) != 0:
            raise ConversionError(
                f"ONNX AveragePool {node.name!r} has count_include_pad=1; Keras/DeepVariant "
                "excludes padding from the average, the native model would not match"
            )


def onnx_layer_outputs(model: onnx.ModelProto) -> dict[str, str]:
    """Native layer name -> ONNX tensor name, for exposing them as extra ORT outputs.

    Layouts: ``mixed0`` ... ``mixed10`` (and ``mixed9_0`` / ``mixed9_1`` when the exporter
    kept the inner concats, which tf2onnx's optimiser does not) are **NCHW** ``[N, C, H, W]``
    (ONNX Conv is NCHW; tf2onnx transposes once at the input), i.e. the native hook's
    ``pool=None`` output is ``onnx.transpose(0, 2, 3, 1)``. ``avg_pool`` is ``[N, 2048]``,
    ``logits`` and ``classification`` are ``[N, num_classes]``.

    The mixed blocks are found by topology: concats (axis 1) whose output feeds something
    other than another concat, in DFS post-order from the classifier; there must be 11.
    """
    g = _OnnxGraph.build(model)
    softmax_out = _classifier_output(g)
    dense = _dense(g, softmax_out)
    concats = [n for n in g.postorder(softmax_out) if n.op_type == "Concat"]
    for n in concats:
        if int(_attr(n, "axis", 0)) not in (1, -3):
            raise ConversionError(f"ONNX Concat {n.name!r} is on axis {_attr(n, 'axis')}, "
                                  "expected the NCHW channel axis 1")
    inner = [n for n in concats
             if all(c.op_type == "Concat" for c in g.consumers.get(n.output[0], []))
             and g.consumers.get(n.output[0])]
    outer = [n for n in concats if n not in inner]
    if len(outer) != 11:
        raise ConversionError(f"ONNX graph has {len(outer)} block concats, expected 11 "
                              "(mixed0 ... mixed10)")
    out = {f"mixed{i}": n.output[0] for i, n in enumerate(outer)}
    # Inner concats, when kept: mixed9 holds mixed9_0 then 'concatenate'; mixed10 holds
    # mixed9_1 then 'concatenate_1' (Keras naming) -- first one per block is the 3x3 split.
    for block, inner_name in (("mixed9", "mixed9_0"), ("mixed10", "mixed9_1")):
        block_node = outer[int(block[5:])]
        firsts = [i for i in block_node.input
                  if g.producer.get(i) is not None and g.producer[i] in inner]
        if len(firsts) == 2:
            out[inner_name] = firsts[0]
    out["avg_pool"] = dense.input_name
    out["logits"] = dense.logits_name
    out["classification"] = softmax_out
    return out
