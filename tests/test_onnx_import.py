"""Specification of the ONNX (tf2onnx) -> native weight import.

Uses the shared ``dv_onnx_path`` fixture: tf2onnx (opset 17) export of DeepVariant's nested
Keras model with every weight randomised, BN statistics included.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("tf2onnx")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import helper, numpy_helper  # noqa: E402

from dvtorch.engine import make_engine  # noqa: E402
from dvtorch.errors import ConversionError  # noqa: E402
from dvtorch.hooks import capture  # noqa: E402
from dvtorch.inception import DeepVariantInceptionV3  # noqa: E402
from dvtorch.onnx_import import onnx_layer_outputs, state_dict_from_onnx  # noqa: E402

pytestmark = [pytest.mark.tf, pytest.mark.slow]
torch.set_num_threads(2)
MIXED = [f"mixed{i}" for i in range(11)]


@pytest.fixture(scope="module")
def proto(dv_onnx_path):
    return onnx.load(str(dv_onnx_path))


@pytest.fixture(scope="module")
def x():
    g = np.random.default_rng(0)
    return ((g.integers(0, 256, (2, 100, 221, 7)) - 128) / 128).astype(np.float32)


def _ort_layers(model: onnx.ModelProto, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """Run ORT with the given native layers exposed as outputs, NHWC like capture(None)."""
    where = onnx_layer_outputs(model)
    m = copy.deepcopy(model)
    del m.graph.output[:]
    for n in names:
        m.graph.output.append(helper.make_tensor_value_info(where[n], onnx.TensorProto.FLOAT,
                                                            None))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    outs = sess.run(None, {m.graph.input[0].name: x})
    return {n: (o.transpose(0, 2, 3, 1) if o.ndim == 4 else o) for n, o in zip(names, outs, strict=True)}


def _native_layers(sd, x, names, optimize):
    model = DeepVariantInceptionV3()
    model.load_state_dict(sd)
    model.eval()
    if optimize:  # the CPU engine: BN folded, fused oneDNN kernels
        _, acts = make_engine(model, names, pool=None)(torch.from_numpy(x))
        return {n: acts[n].numpy() for n in names}
    with torch.inference_mode(), capture(model, names, pool=None) as acts:
        model(torch.from_numpy(x))
    return {n: acts[n].numpy() for n in names}


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("optimize", [False, True])
def test_imported_weights_match_onnxruntime_at_every_block(proto, x, optimize):
    names = [*MIXED, "avg_pool", "classification"]
    ref = _ort_layers(proto, x, names)
    got = _native_layers(state_dict_from_onnx(proto), x, names, optimize)
    for n in names:
        assert got[n].shape == ref[n].shape, n
        assert _max_rel(got[n], ref[n]) <= 1e-4, (n, _max_rel(got[n], ref[n]))


def test_layer_outputs_cover_blocks_and_head(proto):
    where = onnx_layer_outputs(proto)
    assert set(MIXED + ["avg_pool", "logits", "classification"]) <= set(where)
    assert len(set(where.values())) == len(where)
    assert where["classification"] == proto.graph.output[0].name


def test_import_does_not_depend_on_tensor_or_node_names(proto):
    """Keras suffixes depend on session state: rename everything, get the same weights."""
    renamed = copy.deepcopy(proto)
    mapping: dict[str, str] = {}

    def new(name: str) -> str:
        if name not in mapping:
            mapping[name] = f"t{len(mapping) * 7919 % 100003}"
        return mapping[name]

    keep = {i.name for i in renamed.graph.input} | {o.name for o in renamed.graph.output}
    for init in renamed.graph.initializer:
        init.name = new(init.name)
    for node in renamed.graph.node:
        node.name = new(node.name or "node")
        node.input[:] = [i if i in keep or not i else new(i) for i in node.input]
        node.output[:] = [o if o in keep else new(o) for o in node.output]
    a, b = state_dict_from_onnx(proto), state_dict_from_onnx(renamed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unfolded_batchnorm_graphs_are_imported_exactly(proto, x):
    """Conv -> BatchNormalization (with gamma, another epsilon) as other exporters emit."""
    g = np.random.default_rng(1)
    m = copy.deepcopy(proto)
    inits = {i.name: i for i in m.graph.initializer}
    nodes = []
    for node in m.graph.node:
        if node.op_type != "Conv" or len(node.input) < 3:
            nodes.append(node)
            continue
        c = numpy_helper.to_array(inits[node.input[1]]).shape[0]
        params = {"scale": g.uniform(0.5, 1.5, c), "B": g.normal(0, 0.3, c),
                  "mean": g.normal(0, 0.3, c), "var": g.uniform(0.5, 2.0, c)}
        names = []
        for k, v in params.items():
            names.append(f"{node.output[0]}_{k}")
            m.graph.initializer.append(numpy_helper.from_array(v.astype(np.float32), names[-1]))
        mid = node.output[0] + "_prebn"
        bn = helper.make_node("BatchNormalization", [mid, *names], [node.output[0]],
                              epsilon=1e-5)
        node.output[0] = mid
        nodes += [node, bn]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    names = ["mixed0", "mixed5", "mixed10", "classification"]
    ref = _ort_layers(m, x, names)
    got = _native_layers(state_dict_from_onnx(m), x, names, optimize=True)
    for n in names:
        assert _max_rel(got[n], ref[n]) <= 1e-4, (n, _max_rel(got[n], ref[n]))


def _mutate(proto, op_type, fn):
    m = copy.deepcopy(proto)
    node = next(n for n in m.graph.node if n.op_type == op_type)
    fn(m, node)
    return m


def test_graphs_that_are_not_deepvariant_are_refused(proto):
    inc = _mutate(proto, "AveragePool",
                  lambda m, n: n.attribute.append(helper.make_attribute("count_include_pad", 1)))
    with pytest.raises(ConversionError, match="count_include_pad"):
        state_dict_from_onnx(inc)

    def shrink_kernel(m, node):
        init = next(i for i in m.graph.initializer if i.name == node.input[1])
        w = numpy_helper.to_array(init)[:, :, :1, :1].copy()
        init.CopyFrom(numpy_helper.from_array(w, init.name))
        for a in node.attribute:
            if a.name == "kernel_shape":
                a.CopyFrom(helper.make_attribute("kernel_shape", [1, 1]))
    with pytest.raises(ConversionError, match="weight shape"):
        state_dict_from_onnx(_mutate(proto, "Conv", shrink_kernel))

    two_out = copy.deepcopy(proto)
    two_out.graph.output.append(copy.deepcopy(two_out.graph.output[0]))
    two_out.graph.output[1].name = two_out.graph.node[5].output[0]
    with pytest.raises(ConversionError, match="outputs"):
        state_dict_from_onnx(two_out)
