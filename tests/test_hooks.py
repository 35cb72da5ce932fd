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
    return torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(0)) * 2 - 1


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


# ---- what hook experiments rely on ---------------------------------------------------------


@pytest.fixture(scope="module")
def served():
    """The model as ``dvtorch.load`` serves it: BN folded, fused oneDNN convs with weights
    pre-packed for the batch, batch split across threads."""
    from dvtorch.bundle import random_state_dict
    from dvtorch.inception import optimize_for_inference

    m = DeepVariantInceptionV3(SHAPE)
    m.load_state_dict(random_state_dict(3, SHAPE))
    return optimize_for_inference(m.eval(), batch_size=4)


def _pixels(n=4, seed=0):
    return torch.randint(0, 256, (n, *SHAPE), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def test_a_layer_the_last_forward_did_not_reach_is_a_key_error_not_stale(model, x):
    with capture(model, ["mixed1", "mixed5"]) as acts:
        with torch.no_grad():
            model(x)
        assert acts["mixed5"].shape[0] == 3

        def stop(*_):
            raise RuntimeError("stop early")

        h = model.mixed3.register_forward_hook(stop)
        try:
            with torch.no_grad(), pytest.raises(RuntimeError, match="stop early"):
                model(x[:2])
        finally:
            h.remove()
        assert acts["mixed1"].shape[0] == 2
        with pytest.raises(KeyError, match="no forward pass has reached it"):
            acts["mixed5"]


def test_no_layer_names_is_an_error(model):
    with pytest.raises(ValueError, match="no layer names"), capture(model, []):
        pass


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_weight_edits_after_loading_are_used_without_grad_too(served, mode):
    """Channel ablation under no_grad: the pre-packed weight copy must not keep the old
    values (it did: the edit showed with grad on only)."""
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    conv = served.mixed5.conv2d_40.conv
    keep_w, keep_b = conv.weight.detach().clone(), conv.bias.detach().clone()
    try:
        with torch.no_grad():
            conv.weight[3] = 0
            conv.bias[3] = 0
        with ctx(), capture(served, "conv2d_40") as acts:
            served(_pixels())
        assert float(acts["conv2d_40"][:, 3].abs().max()) == 0.0
        assert float(acts["conv2d_40"][:, 4].abs().max()) > 0.0
    finally:
        with torch.no_grad():
            conv.weight.copy_(keep_w)
            conv.bias.copy_(keep_b)


def test_load_state_dict_into_a_served_model_computes_with_the_new_weights(served):
    from dvtorch.bundle import random_state_dict
    from dvtorch.inception import optimize_for_inference

    other = DeepVariantInceptionV3(SHAPE)
    other.load_state_dict(random_state_dict(4, SHAPE))
    other = optimize_for_inference(other.eval(), batch_size=4)
    mine = {k: v.detach().clone() for k, v in served.state_dict().items()}
    try:
        served.load_state_dict(other.state_dict())
        with torch.no_grad(), capture(served, "mixed10") as a, capture(other, "mixed10") as b:
            served(_pixels())
            other(_pixels())
        torch.testing.assert_close(a["mixed10"], b["mixed10"])
    finally:
        served.load_state_dict(mine)


def test_a_hook_on_an_inner_conv_fires_and_sees_the_pre_relu_output(served):
    seen = {}
    block = served.mixed5.conv2d_40
    h = block.conv.register_forward_hook(lambda m, i, o: seen.setdefault("t", o))
    try:
        with torch.no_grad(), capture(served, "conv2d_40", pool=None) as acts:
            served(_pixels())
    finally:
        h.remove()
    pre = seen["t"]
    assert float(pre.min()) < 0  # not overwritten by the block's in-place ReLU
    torch.testing.assert_close(acts["conv2d_40"], pre.relu().permute(0, 2, 3, 1))


def test_pixels_that_are_neither_uint8_nor_preprocessed_floats_are_refused(served):
    with pytest.raises(TypeError, match="int64 pixels: pass raw uint8"):
        served(_pixels().long())
    with pytest.raises(TypeError, match=r"ndarray \(torch.from_numpy converts it\)"):
        served(_pixels().numpy())


def test_layer_names_keras_activation_alias_and_helpful_errors(served):
    from dvtorch.layers import resolve

    assert resolve(served, "activation_40") is served.mixed5.conv2d_40
    assert resolve(served, "activation") is resolve(served, "conv2d")
    with pytest.raises(UnknownLayerError, match="the Dense layer's output is 'logits'"):
        resolve(served, "dense")
    with pytest.raises(UnknownLayerError, match="'mixed5' is ambiguous"):
        resolve(torch.nn.Sequential(served, DeepVariantInceptionV3(SHAPE)), "mixed5")


def test_a_served_model_can_be_deep_copied_and_saved_whole(served, tmp_path):
    """Ablating a copy is the common pattern; the packed oneDNN weights are rebuilt in the
    copy from its own parameters."""
    import copy

    twin = copy.deepcopy(served)
    with torch.no_grad():
        twin.mixed5.conv2d_40.conv.weight.zero_()
        ref, got = served(_pixels()), twin(_pixels())
    assert not torch.allclose(ref, got)
    with torch.no_grad():
        twin.load_state_dict(served.state_dict())
        torch.testing.assert_close(twin(_pixels()), ref)
    torch.save(served, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)  # our own file, just written
    with torch.no_grad():
        torch.testing.assert_close(back(_pixels()), ref)
