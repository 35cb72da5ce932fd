"""Specification of ``capture``: what each pooling mode returns, and hook hygiene."""

from __future__ import annotations

import pytest
import torch

from dvtorch.hooks import capture, pool_activation
from dvtorch.inception import DeepVariantInceptionV3
from dvtorch.layers import UnknownLayerError

torch.set_num_threads(2)
SHAPE = (75, 80, 7)


@pytest.fixture(scope="module")
def model():
    return DeepVariantInceptionV3(SHAPE).eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0))


def _raw_nchw(model, name, x):
    """The module's output through a plain forward hook: the ground truth capture pools."""
    out = {}
    h = getattr(model, name).register_forward_hook(lambda m, i, o: out.setdefault("t", o))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    return out["t"]


def test_pooling_modes_against_the_nhwc_map(model, x):
    raw = _raw_nchw(model, "mixed5", x)            # [N, C, H, W]
    nhwc = raw.permute(0, 2, 3, 1)
    for pool in ("max", "mean", "flatten", None):
        with torch.no_grad(), capture(model, ["mixed5"], pool=pool) as acts:
            model(x)
        got = acts["mixed5"]
        if pool == "max":
            torch.testing.assert_close(got, nhwc.amax(dim=(1, 2)))
        elif pool == "mean":
            torch.testing.assert_close(got, nhwc.mean(dim=(1, 2)))
        elif pool == "flatten":
            n, h, w, c = nhwc.shape
            assert got.shape == (n, h * w * c)
            # Keras Flatten of NHWC: row index = (i * W + j) * C + k
            i, j, k = 1, 0, 5
            assert got[0, (i * w + j) * c + k] == nhwc[0, i, j, k]
            assert not torch.equal(got, raw.reshape(n, -1))  # NCHW order differs
        else:
            assert torch.equal(got, nhwc)


def test_pool_activation_on_a_hand_made_map():
    t = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[10.0, 20.0], [30.0, 40.0]]]])  # [1,2,2,2]
    assert pool_activation(t, "max").tolist() == [[4.0, 40.0]]
    assert pool_activation(t, "mean").tolist() == [[2.5, 25.0]]
    # H, W, C order: (h0,w0,c0), (h0,w0,c1), (h0,w1,c0) ...
    assert pool_activation(t, "flatten").tolist() == [[1, 10, 2, 20, 3, 30, 4, 40]]
    assert pool_activation(t.bfloat16(), "max").dtype == torch.float32
    with pytest.raises(ValueError, match="pool must be"):
        pool_activation(t, "sum")


def test_one_forward_fills_every_layer_including_vectors_and_nested_names(model, x):
    names = ["conv2d_41", "mixed9_0", "avg_pool", "logits", "classification"]
    with torch.no_grad(), capture(model, names) as acts:
        probs = model(x)
    assert list(acts) == names
    assert acts["conv2d_41"].shape == (3, 160)  # mixed5 7x7 branch, 160 channels
    assert acts["mixed9_0"].shape == (3, 768)
    assert acts["avg_pool"].shape == (3, 2048)
    torch.testing.assert_close(acts["classification"], probs)
    torch.testing.assert_close(torch.softmax(acts["logits"], -1), probs)


def test_names_filter_callable_selects_layers(model, x):
    with torch.no_grad(), capture(model, lambda n: n.startswith("mixed") and "_" not in n) as a:
        model(x)
    assert list(a) == [f"mixed{i}" for i in range(11)]


def test_outputs_are_detached_and_on_the_model_device(model, x):
    with capture(model, "mixed3", pool="mean") as acts:
        model(x)  # grad enabled
    assert not acts["mixed3"].requires_grad
    assert acts["mixed3"].device == next(model.parameters()).device


def test_hooks_are_removed_on_exit_and_on_exception(model, x):
    def n_hooks():
        return sum(len(m._forward_hooks) for m in model.modules())

    before = n_hooks()
    with pytest.raises(RuntimeError, match="boom"), capture(model, ["mixed1", "mixed2"]):
        assert n_hooks() == before + 2
        raise RuntimeError("boom")
    assert n_hooks() == before
    with torch.no_grad(), capture(model, ["mixed1"]) as acts:
        model(x)
    assert n_hooks() == before
    assert acts["mixed1"].shape == (3, 288)  # results survive the block


def test_bad_requests_fail_before_any_hook_is_registered(model):
    before = sum(len(m._forward_hooks) for m in model.modules())
    with pytest.raises(UnknownLayerError, match="mixed7"), capture(model, ["mixed1", "mixed77"]):
        pass
    with pytest.raises(ValueError, match="pool"), capture(model, ["mixed1"], pool="median"):
        pass
    assert sum(len(m._forward_hooks) for m in model.modules()) == before


def test_reading_a_layer_before_any_forward_says_so(model):
    with capture(model, ["mixed1"]) as acts, pytest.raises(KeyError, match="no forward"):
        acts["mixed1"]
