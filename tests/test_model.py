"""Specification of the native DeepVariant Inception-v3, its layer names and bundles."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dvtorch import bundle as bundle_mod
from dvtorch.bundle import load, preprocess, reference_bundle, save_bundle
from dvtorch.errors import BundleError
from dvtorch.hooks import capture
from dvtorch.inception import (
    ConvBN,
    DeepVariantInceptionV3,
    avg_pool_same,
    conv_block_names,
    fuse_batchnorm,
    scale_pixels,
)
from dvtorch.layers import LAYER_NAMES, UnknownLayerError, all_layer_names, layer_info, resolve

torch.set_num_threads(2)
SMALL = (75, 80, 7)  # smallest size Keras' InceptionV3 accepts: keeps CPU tests fast


def _randomise_bn(model: DeepVariantInceptionV3, seed: int = 0) -> DeepVariantInceptionV3:
    """Non-trivial BN statistics, so that folding them is actually exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, block in model.conv_blocks():
            n = block.bn.beta.shape[0]
            block.bn.beta.copy_(torch.randn(n, generator=g) * 0.2)
            block.bn.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            block.bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def ref_bundle(tmp_path_factory):
    return reference_bundle(tmp_path_factory.mktemp("ref") / "bundle", seed=0)


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    return reference_bundle(tmp_path_factory.mktemp("small") / "bundle", seed=3, input_shape=SMALL)


def test_spatial_sizes_and_channels_of_every_named_layer_for_100x221():
    model = DeepVariantInceptionV3((100, 221, 7))
    info = {li.name: li for li in layer_info(model)}
    assert [li for li in LAYER_NAMES if li not in info] == []
    assert info["max_pooling2d"].shape_hwc == (23, 53, 64)
    for i in range(3):
        assert info[f"mixed{i}"].shape_hwc[:2] == (10, 25)
    for i in range(3, 8):
        assert info[f"mixed{i}"].shape_hwc == (4, 12, 768)
    for i in range(8, 11):
        assert info[f"mixed{i}"].shape_hwc[:2] == (1, 5)
    assert [info[f"mixed{i}"].channels for i in range(11)] == [
        256,
        288,
        288,
        768,
        768,
        768,
        768,
        768,
        1280,
        2048,
        2048,
    ]
    assert info["mixed9_0"].shape_hwc == (1, 5, 768)
    assert info["avg_pool"].shape_hwc == (2048,)
    assert info["classification"].shape_hwc == (3,)
    assert info["mixed5"].flat_dim == 4 * 12 * 768


def test_conv_blocks_carry_keras_creation_order_names():
    model = DeepVariantInceptionV3()
    assert [n for n, _ in model.conv_blocks()] == conv_block_names()
    assert len(conv_block_names()) == 94
    # Spot checks against keras applications/inception_v3.py creation order:
    assert resolve(model, "conv2d_5").conv.kernel_size == (1, 1)  # mixed0 1x1 branch
    assert resolve(model, "conv2d_7").conv.kernel_size == (5, 5)  # mixed0 5x5 branch
    assert resolve(model, "conv2d_26").conv.stride == (2, 2)  # mixed3 strided 3x3
    assert resolve(model, "conv2d_32").conv.kernel_size == (1, 7)  # mixed4 7x7 branch
    assert resolve(model, "conv2d_93").conv.out_channels == 192  # mixed10 pool branch
    assert resolve(model, "mixed9_1") is model.mixed10.mixed9_1  # Keras names it so
    names = all_layer_names(model)
    assert len(names) == len(set(names))
    assert names.index("conv2d_11") < names.index("mixed0") < names.index("conv2d_12")


def test_state_dict_is_keras_shaped_bn_unfused():
    sd = DeepVariantInceptionV3().state_dict()
    assert len(sd) == 94 * 4 + 2  # kernel + (beta, moving mean, moving var) per block + dense
    assert sd["conv2d.conv.weight"].shape == (32, 7, 3, 3)
    assert set(k.rsplit(".", 1)[1] for k in sd if ".bn." in k) == {
        "beta",
        "running_mean",
        "running_var",
    }
    assert sd["dense.weight"].shape == (3, 2048)


def test_unknown_layer_names_get_suggestions():
    with pytest.raises(UnknownLayerError, match="did you mean mixed5"):
        resolve(DeepVariantInceptionV3(SMALL), "mixed_5")


def test_forward_takes_nhwc_and_returns_probabilities():
    model = DeepVariantInceptionV3(SMALL).eval()
    with torch.no_grad():
        p = model(torch.rand(2, *SMALL) * 2 - 1)
    assert p.shape == (2, 3)
    torch.testing.assert_close(p.sum(1), torch.ones(2))
    with pytest.raises(ValueError, match="NHWC"):
        model(torch.randn(2, SMALL[2], SMALL[0], SMALL[1]))


def test_load_takes_the_cli_dtype_names(tmp_path):
    b = reference_bundle(tmp_path / "b", seed=0)
    assert load(b, dtype="bf16").dense.weight.dtype == torch.bfloat16
    assert load(b, dtype="fp32").dense.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype 'int8': use one of fp32, float32, bf16"):
        load(b, dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(BundleError, match="device 'cuda': torch sees no CUDA GPU"):
            load(b, device="cuda")


def test_unscaled_float_pixels_are_refused():
    """``torch.from_numpy(img).float()`` is 0..254: taken as scaled it gives wrong genotypes."""
    model = DeepVariantInceptionV3(SMALL).eval()
    raw = torch.randint(0, 255, (2, *SMALL), dtype=torch.uint8)
    with torch.no_grad(), pytest.raises(ValueError, match=r"span 0\.\.25\d.*uint8.*preprocess"):
        model(raw.float())
    with torch.no_grad():  # the same pixels as uint8 or preprocessed are fine, and agree
        torch.testing.assert_close(model(raw), model(preprocess(raw)))
        model(preprocess(raw) * 1.4)  # a perturbation experiment slightly outside [-1, 1)


def test_branch_average_pool_excludes_padding_like_tensorflow():
    x = torch.arange(1.0, 10.0).view(1, 1, 3, 3)
    y = avg_pool_same(x)
    assert y[0, 0, 0, 0].item() == pytest.approx((1 + 2 + 4 + 5) / 4)  # not /9
    assert y[0, 0, 1, 1].item() == pytest.approx(5.0)
    assert y[0, 0, 0, 1].item() == pytest.approx((1 + 2 + 3 + 4 + 5 + 6) / 6)


def test_batchnorm_folding_is_equivalent():
    model = _randomise_bn(DeepVariantInceptionV3(SMALL))
    x = torch.rand(3, *SMALL) * 2 - 1
    with torch.no_grad(), capture(model, ["mixed5", "avg_pool"], pool=None) as ref:
        p_ref = model(x)
    ref = dict(ref)
    fuse_batchnorm(model)
    assert not any(".bn." in k for k in model.state_dict())
    with torch.no_grad(), capture(model, ["mixed5", "avg_pool"], pool=None) as got:
        p = model(x)
    for k in ("mixed5", "avg_pool"):
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(p, p_ref, rtol=1e-4, atol=1e-6)


def test_pool_branches_average_pool_inside_their_conv_block():
    """The branch pools have no Keras name; the 1x1 conv after each one owns it, so its
    forward pre-hooks see the unpooled block input."""
    model = DeepVariantInceptionV3(SMALL)
    pooled = [name for name, block in model.conv_blocks() if block.pools_input]
    # mixed0-2, mixed4-7 and mixed9-10 each end with one average-pool branch
    assert pooled == ["conv2d_11", "conv2d_18", "conv2d_25", "conv2d_39", "conv2d_49",
                      "conv2d_59", "conv2d_69", "conv2d_84", "conv2d_93"]
    with pytest.raises(ValueError, match="1x1"):
        ConvBN(8, 8, (3, 3), pools_input=True)


def test_branch_max_pools_carry_their_keras_names_and_can_be_hooked():
    model = _randomise_bn(DeepVariantInceptionV3(SMALL), seed=2)
    names = all_layer_names(model)
    assert names.index("max_pooling2d_2") == names.index("mixed3") - 1
    assert names.index("max_pooling2d_3") == names.index("mixed8") - 1
    x = torch.rand(2, *SMALL) * 2 - 1
    with torch.no_grad(), capture(model, ["max_pooling2d_2", "mixed2"], pool=None) as acts:
        model(x)
    expected = torch.nn.functional.max_pool2d(acts["mixed2"].permute(0, 3, 1, 2), 3, stride=2)
    torch.testing.assert_close(acts["max_pooling2d_2"], expected.permute(0, 2, 3, 1))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_model_takes_raw_uint8_pixels_and_scales_them_exactly_like_preprocess(dtype):
    model = _randomise_bn(DeepVariantInceptionV3(SMALL), seed=4)
    if dtype is not None:
        model.to(dtype)
    pixels = torch.randint(0, 256, (8, *SMALL), dtype=torch.uint8)
    with torch.inference_mode():
        assert torch.equal(model(pixels), model(preprocess(pixels)))
    every_value = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(preprocess(every_value.view(1, 1, 16, 16)).flatten(),
                       (every_value.double() - 128) / 128)


def test_tracing_the_model_for_export_warns_nothing_and_computes_the_same():
    # torch.onnx.export(dynamo=False) traces like this.
    model = _randomise_bn(DeepVariantInceptionV3(SMALL), seed=5)
    x = preprocess(torch.randint(0, 256, (4, *SMALL), dtype=torch.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace's deprecation
        traced = torch.jit.trace(model, x, check_trace=False)
    with torch.no_grad():
        assert torch.allclose(traced(x), model(x), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_pixels_is_exact_for_every_pixel_value_and_keeps_the_shape(dtype):
    every_value = torch.arange(256, dtype=torch.uint8).view(1, 4, 8, 8)
    out = scale_pixels(every_value, dtype)
    assert out.dtype == dtype and out.shape == every_value.shape
    assert torch.equal(out.double(), (every_value.double() - 128) / 128)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scale_pixels_stays_on_the_images_device_with_a_cpu_scalar(dtype):
    # The -1 is a 0-dim CPU tensor (no host-to-device copy per CUDA batch); the meta device
    # stands in for CUDA: the result must live on the images' device, in the asked dtype.
    images = torch.zeros(2, 100, 221, 7, dtype=torch.uint8, device="meta")
    out = scale_pixels(images, dtype)
    assert out.device.type == "meta" and out.dtype == dtype and out.shape == images.shape


def test_preprocess_matches_deepvariant_scaling():
    img = np.array([0, 128, 255], np.uint8).reshape(1, 1, 3, 1)
    out = preprocess(img)
    assert out.dtype == torch.float32 and out.shape == (1, 1, 3, 1)
    assert out.flatten().tolist() == [-1.0, 0.0, 0.9921875]
    assert preprocess(torch.zeros(4, 5, 2, dtype=torch.uint8)).shape == (1, 4, 5, 2)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((1, 2, 2, 1), np.float32))


def test_reference_bundle_round_trip_and_metadata(ref_bundle):
    meta = json.loads((ref_bundle / "bundle.json").read_text())
    assert meta["untrained"] is True and meta["format"] == "dvprobe-bundle"
    assert meta["input_shape"] == [100, 221, 7] and meta["channels"] == [1, 2, 3, 4, 5, 6, 19]
    raw = load(ref_bundle)
    assert not raw.training and raw.bundle_meta["files"] == meta["files"]
    assert any(".bn." in k for k in raw.state_dict())  # Keras variables as stored
    model = fuse_batchnorm(load(ref_bundle))
    x = preprocess(
        torch.randint(
            0, 256, (4, 100, 221, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
        )
    )
    with torch.inference_mode(), capture(model, ["mixed5", "logits"], pool=None) as got:
        p = model(x)
    with torch.inference_mode(), capture(raw, ["mixed5", "logits"], pool=None) as ref:
        raw(x)
    # Float32 itself is accurate to ~2e-6 (mixed5) / 5e-6 (logits) on the reference model
    # (measured against float64); fusion only reorders float32 rounding.
    for name, tol in (("mixed5", 1e-4), ("logits", 1e-4)):
        err = (got[name] - ref[name]).abs().max() / ref[name].abs().max()
        assert err.item() < tol, (name, err.item())
    # Calibrated BN statistics: the untrained model still responds to its input.
    assert p.std(0).max() > 1e-3


def test_bf16_embeddings_agree_with_float32(ref_bundle):
    fp32, bf16 = load(ref_bundle), load(ref_bundle, dtype=torch.bfloat16)
    x = preprocess(
        torch.randint(
            0, 256, (8, 100, 221, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
        )
    )
    with torch.inference_mode(), capture(fp32, "mixed5") as a:
        fp32(x)
    with torch.inference_mode(), capture(bf16, "mixed5") as b:
        p = bf16(x)
    assert p.dtype == torch.float32 and b["mixed5"].dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(a["mixed5"], b["mixed5"], dim=1)
    assert cos.min().item() >= 0.999


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_computes_what_autocast_of_the_float32_model_does(small_bundle,
                                                                                dtype):
    """Why engines fold BN and cast the weights (once) instead of running the float32 model
    under autocast, which re-casts every weight on every inference forward: the numbers
    are the same, bit for bit (ATen's path, which is what the CUDA engine runs)."""
    fp32 = fuse_batchnorm(load(small_bundle))
    half = fuse_batchnorm(load(small_bundle)).to(dtype)
    x = torch.randint(0, 256, (3, *SMALL), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(5))
    names = ["conv2d", "mixed0", "mixed5", "mixed10", "avg_pool"]
    with torch.inference_mode(), capture(fp32, names) as a, torch.autocast("cpu", dtype=dtype):
        p_auto = fp32(x)
    with torch.inference_mode(), capture(half, names) as b:
        p_cast = half(x)
    assert half.dense.weight.dtype == dtype and p_cast.dtype == torch.float32
    assert torch.equal(p_cast, p_auto)
    for name in names:
        assert torch.equal(b[name], a[name]), name


def test_reference_bundle_is_deterministic_by_seed(small_bundle, tmp_path):
    again = reference_bundle(tmp_path / "again", seed=3, input_shape=SMALL)
    other = reference_bundle(tmp_path / "other", seed=4, input_shape=SMALL)
    files = lambda p: json.loads((p / "bundle.json").read_text())["files"]  # noqa: E731
    assert files(again) == files(small_bundle)
    assert files(other) != files(small_bundle)


def test_bundle_errors_name_the_file_and_the_problem(small_bundle, tmp_path):
    import shutil

    broken = tmp_path / "b1"
    shutil.copytree(small_bundle, broken)
    (broken / "weights.safetensors").unlink()
    with pytest.raises(BundleError, match="weights.safetensors: missing"):
        load(broken)

    tampered = tmp_path / "b2"
    shutil.copytree(small_bundle, tampered)
    data = bytearray((tampered / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tampered / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        load(tampered)

    with pytest.raises(BundleError, match="no bundle.json"):
        load(tmp_path)
    with pytest.raises(BundleError, match="already exists"):
        reference_bundle(small_bundle, seed=3, input_shape=SMALL)


# Saves a SMALL bundle to argv[1] but stalls once the weights are written, so that the
# test can kill it mid-write.
_STALLED_SAVE = f"""
import sys, time
from dvtorch import bundle
from dvtorch.inception import DeepVariantInceptionV3
real = bundle.save_file
def stall(*args, **kwargs):
    real(*args, **kwargs)
    print("writing", flush=True)
    time.sleep(120)
bundle.save_file = stall
bundle.save_bundle(sys.argv[1], DeepVariantInceptionV3({SMALL}).state_dict(),
                   {{"input_shape": {list(SMALL)}, "channels": [1, 2, 3, 4, 5, 6, 19]}})
"""


def test_the_next_save_sweeps_what_a_save_killed_mid_write_left(tmp_path):
    out = tmp_path / "bundle"
    proc = subprocess.Popen([sys.executable, "-c", _STALLED_SAVE, str(out)],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.kill()
        proc.wait()
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(".bundle.") and (left / "weights.safetensors").is_file()
    sd = DeepVariantInceptionV3(SMALL).state_dict()
    save_bundle(out, sd, {"input_shape": list(SMALL), "channels": [1, 2, 3, 4, 5, 6, 19]})
    assert list(tmp_path.iterdir()) == [out]


def test_save_bundle_leaves_nothing_on_failure(tmp_path, monkeypatch):
    sd = DeepVariantInceptionV3(SMALL).state_dict()
    meta = {"input_shape": list(SMALL), "channels": [1, 2, 3, 4, 5, 6, 19]}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(bundle_mod, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_bundle(tmp_path / "out", sd, meta)
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(BundleError, match="missing"):
        save_bundle(tmp_path / "out", {k: v for k, v in sd.items() if "conv2d_7." not in k}, meta)
