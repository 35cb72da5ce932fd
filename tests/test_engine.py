"""Specification of the engines beside the plain model: the model's rows, computed faster.

An engine is built from a snapshot of a plain model and returns ``(probs, {layer: rows})``
for a batch of uint8 pixels. Whatever it does for speed (BN folding, fused oneDNN
kernels, worker threads, whole batches in flight), its rows must be the plain model's.
"""

from __future__ import annotations

import copy
import multiprocessing as mp

import pytest
import torch

from dvtorch.bundle import random_state_dict
from dvtorch.engine import make_engine, memory
from dvtorch.engine.cpu import FastMaxPool, pointwise_conv_available
from dvtorch.hooks import capture, run_with_cache
from dvtorch.inception import DeepVariantInceptionV3
from dvtorch.layers import UnknownLayerError

SHAPE = (75, 80, 7)  # the smallest input Keras' InceptionV3 accepts: fast CPU tests
LAYERS = ["conv2d_11", "max_pooling2d_2", "mixed5", "mixed9_0", "concatenate", "mixed10"]


@pytest.fixture(scope="module")
def model():
    m = DeepVariantInceptionV3(SHAPE)
    m.load_state_dict(random_state_dict(3, SHAPE))
    return m.eval().requires_grad_(False)


@pytest.fixture(autouse=True)
def two_threads():
    keep = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(keep)


def _pixels(n=8, seed=0):
    return torch.randint(0, 256, (n, *SHAPE), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def _assert_rows_equal(got, want, tol=1e-4):
    """Equal up to float32 reordering: the parity bar (max error / max |value| <= 1e-4 per
    layer). Probabilities get 5x that: random pixels drive these seeded weights to very
    peaked softmaxes, where the plain float32 model itself is ~2e-5 from float64."""
    probs, acts = got
    want_probs, want_acts = want
    assert float((probs - want_probs).abs().max()) <= 5 * tol
    assert list(acts) == list(want_acts)
    for name in want_acts:
        scale = float(want_acts[name].abs().max()) or 1.0
        assert float((acts[name] - want_acts[name]).abs().max()) <= tol * scale, name


@pytest.mark.parametrize("pool", ["max", "mean", None])
def test_cpu_engine_rows_equal_the_plain_models(model, pool):
    x = _pixels()
    with torch.no_grad():
        want = run_with_cache(model, x, LAYERS, pool=pool)
    engine = make_engine(model, LAYERS, pool, batch_size=8)
    _assert_rows_equal(engine(x), want)
    assert engine.describe()["fused_conv"] == pointwise_conv_available()


def test_batches_in_flight_come_back_in_order_with_their_own_rows(model):
    batches = [_pixels(8, seed) for seed in range(5)]
    with torch.no_grad():
        want = [run_with_cache(model, b, ["mixed5"], pool="max") for b in batches]
    engine = make_engine(model, ["mixed5"], "max", batch_size=8)
    assert engine.describe()["whole_batches_in_flight"] == 2 and engine.ahead == 3
    getters = [engine.submit(b) for b in batches]  # all started before any is taken
    for getter, expected in zip(getters, want, strict=True):
        _assert_rows_equal(getter(), expected)


def test_without_memory_for_whole_batches_each_batch_is_split_and_the_run_says_so(
        model, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 50 << 20)
    said = []
    engine = make_engine(model, ["mixed5"], "max", batch_size=8, log=said.append)
    assert engine.describe()["whole_batches_in_flight"] == 0 and engine.ahead == 1
    assert len(said) == 1 and "each batch is split across the 2 compute threads" in said[0]
    x = _pixels()
    with torch.no_grad():
        _assert_rows_equal(engine(x), run_with_cache(model, x, ["mixed5"], pool="max"))


def test_one_compute_thread_runs_batches_in_the_callers_thread(model):
    torch.set_num_threads(1)
    engine = make_engine(model, ["mixed5"], "max", batch_size=8)
    assert engine.describe()["threads"] == 1 and engine.ahead == 1
    x = _pixels()
    with torch.no_grad():
        _assert_rows_equal(engine(x), run_with_cache(model, x, ["mixed5"], pool="max"))


def test_a_failing_batch_raises_when_its_result_is_taken(model):
    engine = make_engine(model, ["mixed5"], "max", batch_size=8)
    getter = engine.submit(_pixels()[:, :, :40])
    with pytest.raises(ValueError, match="expected NHWC input"):
        getter()
    _assert_rows_equal(engine(_pixels()), engine(_pixels()))  # the engine still works


def test_the_engine_is_a_snapshot_and_leaves_the_model_alone(model):
    mine = copy.deepcopy(model)
    before = {k: v.clone() for k, v in mine.state_dict().items()}
    engine = make_engine(mine, ["mixed5"], "max", dtype="bf16", batch_size=8)
    after = mine.state_dict()
    assert list(after) == list(before)  # BN not folded into the user's model
    assert all(torch.equal(after[k], before[k]) and after[k].dtype == before[k].dtype
               for k in before)
    x = _pixels()
    rows = engine(x)
    with torch.no_grad():
        mine.mixed5.conv2d_40.conv.weight.zero_()
    _assert_rows_equal(engine(x), rows, tol=0)  # built before the edit


def test_a_model_carrying_hooks_is_refused_rather_than_run_without_them(model):
    with capture(model, "mixed5"), pytest.raises(ValueError, match="carries forward hooks"):
        make_engine(model, ["mixed10"], "max")


def test_a_global_forward_hook_is_refused_too(model):
    from torch.nn.modules.module import register_module_forward_hook

    handle = register_module_forward_hook(lambda m, i, o: None)
    try:
        with pytest.raises(ValueError, match="a global hook"):
            make_engine(model, ["mixed5"], "max")
    finally:
        handle.remove()
    make_engine(model, ["mixed5"], "max")  # fine once it is gone


def test_bad_engine_requests_fail_before_any_work(model):
    with pytest.raises(ValueError, match="float16 runs on CUDA only"):
        make_engine(model, ["mixed5"], dtype="fp16")
    with pytest.raises(ValueError, match="compile=True is for CUDA"):
        make_engine(model, ["mixed5"], compile=True)
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        make_engine(model, ["mixed5"], dtype="fp8")
    with pytest.raises(UnknownLayerError, match="did you mean mixed5"):
        make_engine(model, ["mixed_5"])
    with pytest.raises(ValueError, match="pool must be one of"):
        make_engine(model, ["mixed5"], pool="Max")


def test_a_bf16_engine_agrees_with_float32(model):
    x = _pixels(16)
    _, fp32 = make_engine(model, ["mixed5"], "max", batch_size=16)(x)
    probs, bf16 = make_engine(model, ["mixed5"], "max", dtype="bf16", batch_size=16)(x)
    assert probs.dtype == torch.float32 and bf16["mixed5"].dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(fp32["mixed5"], bf16["mixed5"], dim=1)
    assert cos.min().item() >= 0.999


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hw", [(47, 108), (21, 51), (10, 25), (4, 12), (3, 3), (8, 9)])
def test_the_fast_max_pool_equals_atens_exactly(hw, dtype):
    x = torch.randn(2, 5, *hw).to(dtype).contiguous(memory_format=torch.channels_last)
    x[0, 0, 0, 0] = float("nan")  # NaN propagates like ATen's pool
    got = FastMaxPool()(x)
    ref = torch.nn.functional.max_pool2d(x, 3, stride=2)
    assert got.shape == ref.shape and got.dtype == dtype
    torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)


def _child_rows(engine, x, q):
    q.put(engine(x)[0].sum().item())


def test_an_engine_works_in_a_forked_child(model):
    """Loader processes are forked from the extracting process after its engine exists."""
    engine = make_engine(model, ["mixed5"], "max", batch_size=8)
    x = _pixels()
    want = engine(x)[0].sum().item()  # the parent's worker threads exist now
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_rows, args=(engine, x, q))
    p.start()
    p.join(120)
    if p.is_alive():
        p.kill()
        pytest.fail("forked child hung in an engine forward")
    assert p.exitcode == 0
    assert q.get(timeout=5) == pytest.approx(want, rel=1e-5)
