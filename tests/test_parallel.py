"""Batch-split CPU inference (dvtorch.parallel): same outputs and captures as the plain forward."""

from __future__ import annotations

import threading

import pytest
import torch

from dvtorch import parallel
from dvtorch.bundle import random_state_dict
from dvtorch.hooks import capture
from dvtorch.inception import DeepVariantInceptionV3, optimize_for_inference
from dvtorch.layers import LAYER_NAMES

SHAPE = (75, 80, 7)
N = 9  # odd: unequal slices (5 + 4)


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(2)
    sd = random_state_dict(3, SHAPE)
    out = {}
    for split in (False, True):
        m = DeepVariantInceptionV3(SHAPE)
        m.load_state_dict(sd)
        out[split] = optimize_for_inference(m.eval(), batch_size=N, batch_split=split)
    return out


@pytest.fixture(scope="module")
def x():
    return torch.rand(N, *SHAPE, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = parallel.run_split

    def wrapped(fn, x, ways):
        calls.append(ways)
        return real(fn, x, ways)

    monkeypatch.setattr(parallel, "run_split", wrapped)
    return calls


def test_split_forward_matches_the_plain_forward(models, x, spy):
    torch.set_num_threads(2)
    with torch.inference_mode():
        ref = models[False](x)
        got = models[True](x)
    assert spy == [2]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert torch.get_num_threads() == 2  # the workers' single thread does not leak


@pytest.mark.parametrize("pool", ["max", "mean", "flatten", None])
def test_captures_gather_the_slices_in_batch_order(models, x, spy, pool):
    torch.set_num_threads(2)
    names = list(LAYER_NAMES) if pool in ("max", "mean") else ["mixed5", "conv2d_40", "avg_pool"]
    with torch.no_grad():
        with capture(models[False], names, pool=pool) as ref:
            models[False](x)
        with capture(models[True], names, pool=pool) as got:
            models[True](x)
    assert spy == [2]
    assert list(got) == list(ref)
    for n in names:
        assert got[n].shape == ref[n].shape, n
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-5, msg=n)


def test_plain_hooks_keep_full_batches(models, x, spy):
    torch.set_num_threads(2)
    seen = []
    h = models[True].mixed3.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    try:
        with torch.no_grad():
            models[True](x)
    finally:
        h.remove()
    assert seen == [N] and spy == []


def test_no_split_with_grad_one_thread_or_small_batches(models, x, spy):
    torch.set_num_threads(2)
    models[True](x[:2])  # grad enabled
    with torch.no_grad():
        models[True](x[:7])  # 7 // MIN_SLICE == 1
        torch.set_num_threads(1)
        try:
            models[True](x)
        finally:
            torch.set_num_threads(2)
        models[False](x)
    assert spy == []


def test_worker_errors_propagate_and_commit_nothing(models, x, monkeypatch):
    torch.set_num_threads(2)
    model = models[True]

    def boom(t):
        if parallel.in_worker() and t.shape[0] == 4:
            raise RuntimeError("slice failed")
        return t

    monkeypatch.setattr(model.mixed10, "forward", boom)
    with torch.no_grad(), capture(model, "mixed5") as acts:
        with pytest.raises(RuntimeError, match="slice failed"):
            model(x)
        assert len(acts) == 0


def _child_forward(model, x, q):
    with torch.no_grad():
        q.put(model(x).sum().item())


def test_split_forward_works_in_a_forked_child(models, x):
    import multiprocessing as mp

    torch.set_num_threads(2)
    with torch.no_grad():
        want = models[True](x).sum().item()  # the parent's pool exists now
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_forward, args=(models[True], x, q))
    p.start()
    p.join(120)
    if p.is_alive():
        p.kill()
        pytest.fail("forked child hung in a split forward")
    assert p.exitcode == 0
    assert q.get(timeout=5) == pytest.approx(want, rel=1e-5)


# ---- whole batches in flight (submit_whole) ---------------------------------------------


def test_whole_batches_in_flight_equal_the_plain_forward_with_their_own_captures(models, x):
    torch.set_num_threads(2)
    model = models[True]
    threads = []
    depth = parallel.whole_batch_depth(model.modules())
    assert depth == 2
    batches = [x[:4], x[4:], x[2:7]]
    with torch.inference_mode():
        with capture(models[False], ["mixed5", "avg_pool"]) as ref_acts:
            refs = []
            for b in batches:
                refs.append((models[False](b), {n: ref_acts[n] for n in ref_acts}))
        with capture(model, ["mixed5", "avg_pool"]) as acts:
            spy = parallel.split_safe(
                lambda m, i, o: threads.append(threading.current_thread().name))
            h = model.mixed0.register_forward_hook(spy)
            try:
                getters = [parallel.submit_whole(model, b, depth) for b in batches]
                for get, (ref_probs, ref_caps) in zip(getters, refs, strict=True):
                    probs = get()  # commits this batch's captures, and only this batch's
                    torch.testing.assert_close(probs, ref_probs, rtol=1e-5, atol=1e-6)
                    for n, want in ref_caps.items():
                        torch.testing.assert_close(acts[n], want, rtol=1e-5, atol=1e-5)
            finally:
                h.remove()
    # each batch ran whole, on a worker thread, not in the caller's
    assert len(threads) == 3
    assert all(t.startswith("dvtorch-split") for t in threads)
    assert torch.get_num_threads() == 2


def test_whole_batches_only_with_threads_to_spare_and_split_safe_hooks(models):
    model = models[True]
    torch.set_num_threads(1)
    try:
        assert parallel.whole_batch_depth(model.modules()) == 0
    finally:
        torch.set_num_threads(2)
    h = model.mixed3.register_forward_hook(lambda m, i, o: None)
    try:
        assert parallel.whole_batch_depth(model.modules()) == 0
    finally:
        h.remove()
    assert parallel.whole_batch_depth(model.modules()) == 2
    # inside a worker (a nested call) the batch runs in place
    inner = parallel.submit_whole(lambda t: torch.tensor(parallel.whole_batch_depth([])),
                                  torch.zeros(1), 2)
    assert inner().item() == 0


def test_whole_batch_errors_surface_at_the_result_and_commit_nothing(models, x, monkeypatch):
    torch.set_num_threads(2)
    model = models[True]

    def boom(t):
        raise RuntimeError("batch failed")

    monkeypatch.setattr(model.mixed10, "forward", boom)
    with torch.no_grad(), capture(model, "mixed5") as acts:
        get = parallel.submit_whole(model, x, 2)
        with pytest.raises(RuntimeError, match="batch failed"):
            get()
        assert len(acts) == 0
