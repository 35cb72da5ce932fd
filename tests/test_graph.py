"""The oneDNN Graph engine (dvtorch.graph): eager results, checked, with a way back."""

from __future__ import annotations

import logging

import pytest
import torch

from dvtorch import graph
from dvtorch.bundle import random_state_dict
from dvtorch.cpu import mkldnn_bf16
from dvtorch.hooks import capture
from dvtorch.inception import DeepVariantInceptionV3, optimize_for_inference
from dvtorch.layers import UnknownLayerError

pytestmark = pytest.mark.skipif(not graph.available(), reason="torch without oneDNN Graph")

SHAPE = (75, 80, 7)
LAYERS = ["mixed0", "conv2d_40", "mixed10"]
# 9 -> slices (5, 4) at two threads: three checked calls, then one unchecked; 3 and 1 are
# new shapes (one slice each), checked once each
BATCHES = [9, 9, 9, 9, 3, 1]


def _model(dtype: torch.dtype | None = None) -> DeepVariantInceptionV3:
    m = DeepVariantInceptionV3(SHAPE)
    m.load_state_dict(random_state_dict(5, SHAPE))
    return optimize_for_inference(m.eval(), dtype=dtype, batch_size=9)


def _pixels(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, *SHAPE), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def _eager(model, pixels, pool):
    with torch.inference_mode(), capture(model, LAYERS, pool=pool) as acts:
        probs = model(pixels)
        return probs, {n: acts[n] for n in LAYERS}


@pytest.fixture(scope="module")
def fp32_model():
    return _model()


@pytest.mark.parametrize("pool", ["max", "mean", "flatten", None])
def test_outputs_equal_the_eager_captures_for_every_pool_and_batch_size(fp32_model, pool):
    torch.set_num_threads(2)
    engine = graph.GraphForward(fp32_model, LAYERS, pool)
    for i, n in enumerate(BATCHES):
        px = _pixels(n, i)
        with torch.inference_mode():
            probs, acts = engine(px)
        ref_probs, ref = _eager(fp32_model, px, pool)
        torch.testing.assert_close(probs, ref_probs, rtol=1e-4, atol=1e-5)
        assert list(acts) == LAYERS
        for name in LAYERS:
            assert acts[name].shape == ref[name].shape and acts[name].dtype == torch.float32
            assert graph._relative_error(acts[name].reshape(n, -1),
                                         ref[name].reshape(n, -1)) < 1e-4
    assert engine.fallback_reason is None
    assert len(engine.checks) == 3 + 1 + 1  # the fourth call of (5, 4) is not re-checked
    assert max(program for program, _ in engine.checks) < 1e-4
    assert all(own == 0 for _, own in engine.checks)  # fp32: eager is the reference
    assert not torch._C._jit_llga_enabled()  # the process-wide flag is put back
    assert sorted(engine._programs) == [1, 3, 4, 5]  # one program per slice size


def test_batch_sizes_beyond_the_programs_run_eagerly(fp32_model):
    torch.set_num_threads(2)
    engine = graph.GraphForward(fp32_model, LAYERS, "max")
    with torch.inference_mode():
        for n in (9, 3, 1):
            engine(_pixels(n, n))
        px = _pixels(2, 0)  # a fifth slice size
        probs, acts = engine(px)
    assert len(engine._programs) == graph.MAX_PROGRAMS and 2 not in engine._programs
    ref_probs, ref = _eager(fp32_model, px, "max")
    torch.testing.assert_close(probs, ref_probs, rtol=0, atol=0)  # the eager forward itself
    assert engine.fallback_reason is None


@pytest.mark.skipif(not mkldnn_bf16(), reason="oneDNN has no bf16 convolution on this CPU")
def test_bf16_program_stays_within_its_tolerance_of_eager_bf16():
    torch.set_num_threads(2)
    model = _model(torch.bfloat16)
    engine = graph.GraphForward(model, LAYERS, "max")
    for i in range(3):
        px = _pixels(9, i)
        with torch.inference_mode():
            _, acts = engine(px)
        _, ref = _eager(model, px, "max")
        for name in LAYERS[:2]:  # mixed10 of this small random model is ill-conditioned
            cos = torch.nn.functional.cosine_similarity(acts[name], ref[name], dim=1)
            assert float(cos.min()) > 0.999
    assert engine.fallback_reason is None
    # as far from float32 as the eager bf16 forward is, give or take the gate's margin
    assert all(0 < program <= graph.ERROR_RATIO * own + graph.ERROR_FLOOR
               for program, own in engine.checks)
    assert engine._reference is None  # the float32 twin is freed once the shape is trusted


class _Skewed:
    """A program that is wrong in one output block: how a miscompiled graph would look."""

    def __init__(self, program, block: int, factor: float, widths: list[int]):
        self.program, self.block, self.factor, self.widths = program, block, factor, widths
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        out = self.program(x).clone()
        start = sum(self.widths[: self.block])
        out[:, start:start + self.widths[self.block]] *= self.factor
        return out


@pytest.mark.parametrize(("block", "reason"), [
    # output blocks: softmax, then the taps avg_pool, logits, mixed0, conv2d_40, mixed10
    (0, "its softmax differs from softmax(its logits)"),
    (2, "logits is"),
    (4, "conv2d_40 is"),
])
def test_a_wrong_program_is_caught_and_the_eager_forward_takes_over(
        fp32_model, monkeypatch, caplog, block, reason):
    torch.set_num_threads(2)
    engine = graph.GraphForward(fp32_model, LAYERS, "max")
    real_trace = graph.GraphForward._trace
    skewed: list[_Skewed] = []

    def trace(self, example):
        program = real_trace(self, example)
        skewed.append(_Skewed(program, block, 1.5, self._widths))
        return skewed[-1]

    monkeypatch.setattr(graph.GraphForward, "_trace", trace)
    px = _pixels(9, 0)
    with caplog.at_level(logging.WARNING, logger="dvtorch.graph"), torch.inference_mode():
        probs, acts = engine(px)
        calls = sum(s.calls for s in skewed)  # one per batch slice (5 + 4: two programs)
        again = engine(_pixels(9, 1))
    ref_probs, ref = _eager(fp32_model, px, "max")
    torch.testing.assert_close(probs, ref_probs)  # the eager result, not the wrong one
    for name in LAYERS:
        torch.testing.assert_close(acts[name], ref[name])
    assert engine.fallback_reason is not None and reason in engine.fallback_reason
    assert "using the eager forward" in caplog.text
    assert calls == 2 and sum(s.calls for s in skewed) == calls  # never called again
    torch.testing.assert_close(again[0], _eager(fp32_model, _pixels(9, 1), "max")[0])


def test_an_exception_in_the_program_falls_back_to_eager(fp32_model, monkeypatch, caplog):
    def broken(self, example):
        def run(x):
            raise RuntimeError("The following operation failed in the TorchScript "
                               "interpreter.\nRuntimeError: partition compile failed")
        return run

    monkeypatch.setattr(graph.GraphForward, "_trace", broken)
    engine = graph.GraphForward(fp32_model, LAYERS, "max")
    px = _pixels(9, 0)
    with caplog.at_level(logging.WARNING, logger="dvtorch.graph"), torch.inference_mode():
        probs, _ = engine(px)
    torch.testing.assert_close(probs, _eager(fp32_model, px, "max")[0])
    assert "raised RuntimeError: RuntimeError: partition compile failed" in engine.fallback_reason
    assert "partition compile failed" in caplog.text


def test_refuses_what_it_cannot_run(fp32_model):
    with pytest.raises(ValueError, match="fp32 or bf16"):
        graph.GraphForward(_model().half(), LAYERS)
    with pytest.raises(UnknownLayerError, match="did you mean mixed5"):
        graph.GraphForward(fp32_model, ["mixed_5"])  # at construction, not at the first batch
    with pytest.raises(ValueError, match="pool must be one of"):
        graph.GraphForward(fp32_model, LAYERS, pool="Max")
    engine = graph.GraphForward(fp32_model, LAYERS)
    with pytest.raises(ValueError, match="uint8 NHWC"):
        engine(torch.zeros(2, *SHAPE))
    engine(_pixels(2, 0))
    # a caller's slip (NCHW) is refused before it reaches a program, which would otherwise
    # have raised and switched the engine to eager for good
    with pytest.raises(ValueError, match="uint8 NHWC pixels"):
        engine(_pixels(2, 0).permute(0, 3, 1, 2).contiguous())
    assert engine.fallback_reason is None


def test_hooks_are_refused_at_construction_and_a_later_one_hands_over_to_eager(fp32_model):
    """A traced program runs the hooks present at tracing once and never again; a hook
    experiment on the engine would silently measure the unhooked model."""
    h = fp32_model.mixed5.register_forward_hook(lambda m, i, o: o * 0)
    try:
        with pytest.raises(ValueError, match="forward hook"):
            graph.GraphForward(fp32_model, LAYERS)
    finally:
        h.remove()
    engine = graph.GraphForward(fp32_model, LAYERS)
    for seed in range(4):
        engine(_pixels(9, seed))
    plain = _eager(fp32_model, _pixels(9, 0), "max")[1]["mixed10"]
    h = fp32_model.mixed5.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    try:
        got = engine(_pixels(9, 0))[1]["mixed10"]
        assert "forward hook was added" in engine.fallback_reason
        ablated = _eager(fp32_model, _pixels(9, 0), "max")[1]["mixed10"]
    finally:
        h.remove()
    assert not torch.allclose(ablated, plain)
    torch.testing.assert_close(got, ablated)  # the hook ran


def test_programs_pool_after_the_conv_but_onnx_exports_keep_keras_order(fp32_model):
    import io

    import onnx

    # the program: each 3x3 average pool reads a (1x1) conv's output
    engine = graph.GraphForward(fp32_model, LAYERS, "max")
    with torch.inference_mode():
        engine(_pixels(9, 0))
    nodes = list(engine._programs[5].graph.nodes())
    pools = [n for n in nodes if n.kind() == "aten::avg_pool2d"]
    assert len(pools) == 9  # mixed0-2, 4-7, 9-10
    assert all("conv" in next(iter(p.inputs())).node().kind() for p in pools)
    # an ONNX export (the reference onnxruntime runs) keeps Keras's pool-then-conv order
    buf = io.BytesIO()
    torch.onnx.export(fp32_model, (torch.zeros(1, *SHAPE),), buf, dynamo=False,
                      opset_version=17)
    g = onnx.load_from_string(buf.getvalue()).graph
    producer = {out: n.op_type for n in g.node for out in n.output}
    pools = [n for n in g.node if n.op_type == "AveragePool"]
    assert len(pools) == 9 and all(producer.get(p.input[0]) != "Conv" for p in pools)



def test_submitted_batches_give_the_eager_results_in_flight_together(fp32_model):
    torch.set_num_threads(2)
    engine = graph.GraphForward(fp32_model, LAYERS, "max")
    assert engine.depth == 2
    sizes = [9, 9, 9, 9, 9, 9, 3, 3]
    batches = [_pixels(n, 10 + i) for i, n in enumerate(sizes)]
    with torch.inference_mode():
        pending = [engine.submit(px) for px in batches]  # all started before any result
        # a program's first three calls ran here, checked; later ones went to the workers
        on_workers = [p._pending is not None for p in pending]
        results = [p.result() for p in pending]
    assert on_workers == [False, False, False, True, True, True, False, False]
    for px, (probs, acts) in zip(batches, results, strict=True):
        ref_probs, ref = _eager(fp32_model, px, "max")
        torch.testing.assert_close(probs, ref_probs, rtol=1e-4, atol=1e-5)
        for name in LAYERS:
            assert acts[name].shape == ref[name].shape
            assert graph._relative_error(acts[name].reshape(px.shape[0], -1),
                                         ref[name].reshape(px.shape[0], -1)) < 1e-4
    assert engine.fallback_reason is None
    assert sorted(engine._programs) == [3, 9]  # whole-batch programs
    assert len(engine.checks) == 3 + 2
    assert not torch._C._jit_llga_enabled()  # put back once the last worker call is done


def test_a_program_raising_on_a_worker_hands_that_batch_and_later_ones_to_eager(
        fp32_model, monkeypatch, caplog):
    torch.set_num_threads(2)
    engine = graph.GraphForward(fp32_model, LAYERS, "max")
    with torch.inference_mode():
        for i in range(graph.CHECK_CALLS):
            engine.submit(_pixels(9, i)).result()

        def broken(pixels):
            raise RuntimeError("oneDNN Graph: partition execution failed")

        monkeypatch.setattr(engine, "_run_on_worker", broken)
        px = _pixels(9, 7)
        with caplog.at_level(logging.WARNING, logger="dvtorch.graph"):
            pending = engine.submit(px)
            probs, acts = pending.result()
        later = engine.submit(_pixels(9, 8))
    ref_probs, ref = _eager(fp32_model, px, "max")
    torch.testing.assert_close(probs, ref_probs, rtol=0, atol=0)  # the eager forward itself
    assert "partition execution failed" in engine.fallback_reason
    assert "using the eager forward" in caplog.text
    assert later._pending is None  # no more worker calls once the engine has fallen back
    torch.testing.assert_close(later.result()[0], _eager(fp32_model, _pixels(9, 8), "max")[0],
                               rtol=0, atol=0)
