"""Specification of the hook points: ``capture`` (pooling modes, hygiene), ``patch``,
``run_with_cache``, and the plain-model behaviour hook experiments rely on."""

from __future__ import annotations

import contextlib

import pytest
import torch

from dvtorch.hooks import capture, patch, pool_activation, run_with_cache
from dvtorch.inception import DeepVariantInceptionV3
from dvtorch.layers import LAYER_NAMES, UnknownLayerError

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


# ---- what hook experiments rely on: the model is a plain nn.Module ------------------------


@pytest.fixture(scope="module")
def trained_like():
    """A model with calibrated, seeded weights (activations look like a working network's)."""
    from dvtorch.bundle import random_state_dict

    m = DeepVariantInceptionV3(SHAPE)
    m.load_state_dict(random_state_dict(3, SHAPE))
    return m.eval().requires_grad_(False)


def _pixels(n=4, seed=0):
    return torch.randint(0, 256, (n, *SHAPE), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def _zero_channel(channel):
    return lambda out, name: out.index_fill(1, torch.tensor([channel]), 0.0)


def test_a_patch_that_zeroes_mixed5_changes_the_prediction(trained_like):
    with torch.no_grad():
        before = trained_like(_pixels())
        with patch(trained_like, {"mixed5": lambda out, name: torch.zeros_like(out)}):
            ablated = trained_like(_pixels())
        after = trained_like(_pixels())
    assert (ablated - before).abs().max() > 1e-3
    assert torch.equal(after, before)  # the patch is gone with its block


def test_a_patch_that_returns_none_only_looks(trained_like):
    seen = []
    with torch.no_grad():
        before = trained_like(_pixels())
        with patch(trained_like, {"mixed5": lambda out, name: seen.append(name)}):
            same = trained_like(_pixels())
    assert seen == ["mixed5"] and torch.equal(same, before)


def test_capture_sees_the_patched_output_whichever_block_comes_first(trained_like):
    for patch_first in (True, False):
        with torch.no_grad(), contextlib.ExitStack() as stack:
            if patch_first:
                stack.enter_context(patch(trained_like, {"mixed5": _zero_channel(7)}))
            acts = stack.enter_context(capture(trained_like, ["mixed5", "mixed6"], pool="max"))
            if not patch_first:
                stack.enter_context(patch(trained_like, {"mixed5": _zero_channel(7)}))
            trained_like(_pixels())
        assert float(acts["mixed5"][:, 7].abs().max()) == 0.0
        assert float(acts["mixed5"][:, 8].abs().max()) > 0.0


def test_nested_patches_run_outermost_first_and_the_inner_one_has_the_last_word(trained_like):
    order = []

    def zero_all(out, name):
        order.append("outer")
        return torch.zeros_like(out)

    def restore_7(out, name):
        order.append("inner")
        assert float(out.abs().max()) == 0.0  # sees the outer patch's output
        return out.index_fill(1, torch.tensor([7]), 1.0)

    with torch.no_grad(), capture(trained_like, "mixed5", pool="max") as acts, \
            patch(trained_like, {"mixed5": zero_all}), \
            patch(trained_like, {"mixed5": restore_7}):
        trained_like(_pixels())
    assert order == ["outer", "inner"] * 1
    assert float(acts["mixed5"][:, 7].min()) == 1.0 and float(acts["mixed5"][:, 8].max()) == 0.0


def test_a_patch_must_return_a_tensor_like_the_layers_output(trained_like):
    for bad, said in ((lambda out, name: 0, "returned int"),
                      (lambda out, name: out.double(), "returned dtype torch.float64")):
        with patch(trained_like, {"mixed5": bad}), torch.no_grad(), \
                pytest.raises((TypeError, ValueError), match=said):
            trained_like(_pixels())


def test_patches_are_checked_before_any_forward(trained_like):
    with pytest.raises(UnknownLayerError, match="did you mean mixed5"), \
            patch(trained_like, {"mixed_5": _zero_channel(0)}):
        pass
    with pytest.raises(TypeError, match="must be callable"), \
            patch(trained_like, {"mixed5": 0.0}):
        pass
    with patch(trained_like, {"mixed5": lambda out, name: out[:, :3]}), \
            pytest.raises(ValueError, match="returned shape"), torch.no_grad():
        trained_like(_pixels())


def test_run_with_cache_returns_the_probabilities_and_whole_maps(trained_like):
    with torch.no_grad():
        probs, cache = run_with_cache(trained_like, _pixels(), names_filter=["mixed5", "logits"])
        torch.testing.assert_close(probs, trained_like(_pixels()))
    assert set(cache) == {"mixed5", "logits"}
    assert cache["mixed5"].shape[0] == 4 and cache["mixed5"].shape[-1] == 768  # NHWC
    torch.testing.assert_close(cache["logits"].softmax(-1), probs)
    _, everything = run_with_cache(trained_like, _pixels(1), pool="max")
    assert list(everything) == LAYER_NAMES


def test_a_data_weight_edit_is_seen_by_the_next_forward(trained_like):
    import copy

    twin = copy.deepcopy(trained_like)
    with torch.no_grad():
        before = twin(_pixels())
        twin.mixed5.conv2d_40.conv.weight.data.zero_()
        after = twin(_pixels())
    assert (after - before).abs().max() > 1e-4


def test_deepcopy_gives_an_independent_model(trained_like, tmp_path):
    import copy

    twin = copy.deepcopy(trained_like)
    with torch.no_grad():
        ref = trained_like(_pixels())
        twin.mixed5.conv2d_40.conv.weight.zero_()
        assert not torch.allclose(twin(_pixels()), ref)
        torch.testing.assert_close(trained_like(_pixels()), ref)  # the original is untouched
    torch.save(trained_like, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)  # our own file, just written
    with torch.no_grad():
        torch.testing.assert_close(back(_pixels()), ref)


def test_the_gradient_of_a_logit_matches_finite_differences(trained_like):
    import copy

    from dvtorch.bundle import preprocess

    model = copy.deepcopy(trained_like).double()  # float64: finite differences are exact
    logits = {}

    def keep(out, name):
        logits["t"] = out

    x = preprocess(_pixels(1)).double().requires_grad_(True)
    with patch(model, {"logits": keep}):
        model(x)
        (grad,) = torch.autograd.grad(logits["t"][0, 1], x)
        assert float(grad.abs().sum()) > 0
        eps = 1e-6
        for pixel in [(0, 37, 40, 0), (0, 10, 30, 3), (0, 60, 70, 6)]:
            bumped = [x.detach().clone() for _ in range(2)]
            bumped[0][pixel] += eps
            bumped[1][pixel] -= eps
            with torch.no_grad():
                ups = []
                for b in bumped:
                    model(b)
                    ups.append(float(logits["t"][0, 1]))
            numeric = (ups[0] - ups[1]) / (2 * eps)
            assert numeric == pytest.approx(float(grad[pixel]), rel=1e-4, abs=1e-9)


def test_a_hook_on_an_inner_conv_fires_and_sees_the_pre_bn_output(trained_like):
    block = trained_like.mixed5.conv2d_40
    with torch.no_grad(), capture(trained_like, "conv2d_40", pool=None) as acts:
        seen = {}
        h = block.conv.register_forward_hook(lambda m, i, o: seen.setdefault("t", o))
        try:
            trained_like(_pixels())
        finally:
            h.remove()
    expected = block.relu(block.bn(seen["t"]))
    torch.testing.assert_close(acts["conv2d_40"], expected.permute(0, 2, 3, 1))


def test_pixels_that_are_neither_uint8_nor_preprocessed_floats_are_refused(trained_like):
    with pytest.raises(TypeError, match="int64 pixels: pass raw uint8"):
        trained_like(_pixels().long())
    with pytest.raises(TypeError, match=r"ndarray \(torch.from_numpy converts it\)"):
        trained_like(_pixels().numpy())


def test_layer_names_keras_activation_alias_and_helpful_errors(trained_like):
    from dvtorch.layers import resolve

    assert resolve(trained_like, "activation_40") is trained_like.mixed5.conv2d_40
    assert resolve(trained_like, "activation") is resolve(trained_like, "conv2d")
    with pytest.raises(UnknownLayerError, match="the Dense layer's output is 'logits'"):
        resolve(trained_like, "dense")
    with pytest.raises(UnknownLayerError, match="'mixed5' is ambiguous"):
        resolve(torch.nn.Sequential(trained_like, DeepVariantInceptionV3(SHAPE)), "mixed5")


@pytest.mark.slow
def test_torch_compile_computes_what_the_model_does(trained_like):
    compiled = torch.compile(trained_like)
    with torch.no_grad():
        torch.testing.assert_close(compiled(_pixels()), trained_like(_pixels()),
                                   rtol=1e-4, atol=1e-5)
