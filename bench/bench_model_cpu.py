"""CPU throughput of the native model vs onnxruntime on the same weights.

    OMP_NUM_THREADS=2 python bench/bench_model_cpu.py --batch-size 32 --threads 2 --iters 9

Builds the seeded reference weights (``dvtorch.bundle.random_state_dict``: calibrated BN
statistics, so activations look like a working network's rather than collapsing), exports
them to ONNX for onnxruntime (``--onnx PATH`` to time a tf2onnx export instead; weights are
then imported from it with ``state_dict_from_onnx``), and times, interleaved round by round
so that machine noise hits every variant alike:

* ``ort_fp32``           onnxruntime CPU, float32, ``--threads`` intra-op threads
* ``plain_fp32``         the plain model as ``dvtorch.load`` returns it (BN unfused, ATen)
* ``engine_split_fp32``  the CPU engine (:mod:`dvtorch.engine.cpu`: BN folded, fused oneDNN
  conv+ReLU, pre-packed weights), each batch cut into one slice per thread
* ``engine_fp32`` / ``engine_bf16``  the CPU engine as extraction runs it: whole batches
  side by side on the worker threads, ``3 x threads`` batches per round with at most
  ``engine.ahead`` in flight (the rate counts every example of the round)

``--busy 1`` keeps one extra process spinning while timing: what a shared 2-core machine
looks like.

Like ``dvprobe extract`` on CPU, the process first calls
``dvtorch.engine.allocator.reuse_freed_memory()`` (glibc keeps freed activation buffers
instead of page-faulting them back in on every forward; onnxruntime has its own arena).

Prints median examples/s, ratios to onnxruntime, and the cosine similarity of bf16 vs
fp32 max-pooled mixed5 embeddings (the blog's probing layer).
"""

from __future__ import annotations

import argparse
import collections
import io
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from dvtorch.bundle import preprocess, random_state_dict
from dvtorch.engine import make_engine
from dvtorch.engine.allocator import reuse_freed_memory
from dvtorch.engine.cpu import CPUEngine
from dvtorch.engine.cpu_features import describe
from dvtorch.inception import DeepVariantInceptionV3, fuse_batchnorm
from dvtorch.onnx_import import state_dict_from_onnx

SHAPE = (100, 221, 7)


def export_onnx(sd: dict[str, torch.Tensor]) -> bytes:
    """ONNX of the BN-folded native model (TorchScript exporter, opset 17), NHWC input.

    Same graph shape as tf2onnx emits for DeepVariant: one NHWC->NCHW transpose, Conv with
    folded BN, Relu, pools with count_include_pad=0, Concat, mean, Gemm, Softmax.
    """
    model = DeepVariantInceptionV3(SHAPE)
    model.load_state_dict(sd)
    fuse_batchnorm(model.eval())
    buf = io.BytesIO()
    torch.onnx.export(model, (torch.zeros(1, *SHAPE),), buf, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["classification"],
                      dynamic_axes={"input": {0: "n"}, "classification": {0: "n"}})
    return buf.getvalue()


def plain(sd: dict[str, torch.Tensor]) -> DeepVariantInceptionV3:
    model = DeepVariantInceptionV3(SHAPE)
    model.load_state_dict(sd)
    return model.eval().requires_grad_(False)


def engines(model: DeepVariantInceptionV3, batch: int) -> dict[str, CPUEngine]:
    """The engines timed, each capturing max-pooled mixed5 as extraction does."""
    return {
        "engine_split_fp32": CPUEngine(model, ["mixed5"], "max", batch_size=batch,
                                       whole_batches=False),
        "engine_fp32": make_engine(model, ["mixed5"], "max", batch_size=batch),
        "engine_bf16": make_engine(model, ["mixed5"], "max", dtype="bf16", batch_size=batch),
    }


def stream(engine: CPUEngine, x: torch.Tensor, batches: int) -> Callable[[], object]:
    """``batches`` batches through the engine as extraction feeds it: up to
    ``engine.ahead`` in flight, results taken in order."""
    def run() -> None:
        in_flight: collections.deque = collections.deque()
        for _ in range(batches):
            in_flight.append(engine.submit(x))
            while len(in_flight) > engine.ahead:
                in_flight.popleft()()
        while in_flight:
            in_flight.popleft()()
    return run


def ort_session(onnx_bytes: bytes, threads: int = 1,
                profile_prefix: str | None = None) -> ort.InferenceSession:
    """onnxruntime CPU session with ``threads`` intra-op threads, all graph optimisations
    (profiling to ``profile_prefix`` when given): the reference every CPU bench times."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])


def _time_all(runs: dict[str, Callable[[], object]], times: dict[str, list[float]],
              iters: int) -> None:
    """One warm-up call each, then ``iters`` rounds calling every variant once per round."""
    with torch.inference_mode():
        for f in runs.values():
            f()  # warm-up (oneDNN primitive creation, ORT arena)
        for _ in range(iters):
            for k, f in runs.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5, help="timed rounds (after one warm-up)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--onnx", help="time this tf2onnx export instead of the seeded model")
    ap.add_argument("--busy", type=int, default=0,
                    help="processes spinning on the CPU while timing (a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    malloc_reuse = reuse_freed_memory()

    if args.onnx:
        onnx_bytes = Path(args.onnx).read_bytes()
        sd = state_dict_from_onnx(onnx.load_from_string(onnx_bytes))
        source = args.onnx
    else:
        sd = random_state_dict(args.seed, SHAPE)
        onnx_bytes = export_onnx(sd)
        source = f"seeded reference weights (seed {args.seed}), torch.onnx export"
    sess = ort_session(onnx_bytes, args.threads)
    in_name = sess.get_inputs()[0].name

    gen = torch.Generator().manual_seed(args.seed)
    x = preprocess(torch.randint(0, 256, (args.batch_size, *SHAPE), dtype=torch.uint8,
                                 generator=gen))
    xn = x.numpy()
    model = plain(sd)
    timed = engines(model, args.batch_size)
    runs: dict[str, Callable[[], object]] = {"ort_fp32": lambda: sess.run(None, {in_name: xn}),
                                             "plain_fp32": lambda: model(x)}
    examples = {"ort_fp32": args.batch_size, "plain_fp32": args.batch_size}
    per_round = 3 * args.threads  # whole batches: every worker busy for most of the round
    for name, engine in timed.items():
        runs[name] = stream(engine, x, per_round)
        examples[name] = per_round * args.batch_size

    times: dict[str, list[float]] = {k: [] for k in runs}
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(args.busy)]
    try:
        _time_all(runs, times, args.iters)
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    p_ref = sess.run(None, {in_name: xn})[0]
    p_eng, a = timed["engine_fp32"](x)
    _, b = timed["engine_bf16"](x)
    cos = torch.nn.functional.cosine_similarity(a["mixed5"], b["mixed5"], dim=1)

    print(f"source: {source}")
    print(describe())
    print(f"batch {args.batch_size}, threads {args.threads}, {args.iters} rounds, "
          f"torch {torch.__version__}, onnxruntime {ort.__version__}, "
          f"malloc reuse {'on' if malloc_reuse else 'unavailable'}, "
          f"{args.busy} busy process(es) alongside")
    print(f"softmax max |engine fp32 - ort| = {float(np.abs(p_eng.numpy() - p_ref).max()):.2e}")
    base = args.batch_size / statistics.median(times["ort_fp32"])
    plain_rate = args.batch_size / statistics.median(times["plain_fp32"])
    for k, ts in times.items():
        rate = examples[k] / statistics.median(ts)
        best = examples[k] / min(ts)
        print(f"{k:18s} {rate:8.1f} ex/s (best {best:7.1f})  x{rate / base:4.2f} vs ort_fp32"
              f"  x{rate / plain_rate:4.2f} vs plain_fp32")
    print(f"bf16 vs fp32 mixed5 max-pooled cosine: min {cos.min().item():.5f} "
          f"mean {cos.mean().item():.5f}")


if __name__ == "__main__":
    main()
